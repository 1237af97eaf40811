"""Programs that try to forge the code reward or reach outside their sample, at every isolation level
the machine offers. None may turn a failing test into `passed`; honest programs still pass."""
import os
import socket
import subprocess
import threading
import time
import uuid

import pytest

from score_train.rewards import sandbox as sbx
from score_train.rewards.code import ISOLATION_LEVELS, check_program, sandbox_mode


def _available():
    out = []
    for level in ISOLATION_LEVELS:
        try:
            sandbox_mode(level)
            out.append(level)
        except RuntimeError:
            pass
    return out


LEVELS = _available()
WRONG = "def f(x):\n    return 0\n"
FAILING = "assert f(1) == 2\n"  # fails for WRONG
# for the shadowing attacks: fails for WRONG unless a name the tests use means something else
FAILING_WITH = {
    "shadow_builtins": "assert f(1) == 2 or abs(f(1) - 2) < 1e-9 or isinstance(f(1), str) or len([f(1)]) == 0\n",
    "fake_math_module": "assert math.isclose(f(1), 2) or math.fabs(f(1) - 2) < 1e-9\n",
}

# Each attack is the program text; appended to WRONG, so an honest verdict is "not passed".
FORGERIES = {
    # issue 16 §1: the old harness's nonce, printed by the program itself
    "nonce_from_main": "import sys, os\nn = sys.modules['__main__']._nonce\n"
                       "os.write(1, ('\\n' + n + '\\n').encode())\nos._exit(0)\n",
    # issue 16 §1: the old harness's _finish, patched to report success
    "patch_finish": "import sys, os\nm = sys.modules['__main__']\nm._finish = lambda code: os._exit(0)\n",
    "os_exit_0_first": "import os\nos._exit(0)\n",
    "sys_exit_monkeypatch": "import sys, os\nsys.exit = lambda *a: os._exit(0)\n",
    "atexit_exit_0": "import atexit, os\natexit.register(lambda: os._exit(0))\n",
    "assertionerror_swap": "import builtins\nclass Harmless(Exception):\n    pass\nbuiltins.AssertionError = Harmless\n",
    "builtins_dict_patch": "__builtins__ if isinstance(__builtins__, dict) else None\nimport builtins\n"
                           "builtins.__dict__['AssertionError'] = KeyError\nbuiltins.__dict__['len'] = lambda x: 0\n",
    "redefine_assertionerror": "class AssertionError(Exception):\n    pass\n",
    "signal_handlers": "import signal, os\nfor s in (signal.SIGTERM, signal.SIGALRM, signal.SIGINT, signal.SIGHUP):\n"
                       "    signal.signal(s, lambda *a: os._exit(0))\nsignal.alarm(1)\n",
    "fork_child_prints_success": "import os\nif os.fork() == 0:\n    print('passed')\n    os._exit(0)\n"
                                 "os.wait()\n",
    "fake_verdicts_on_every_fd": (
        "import os\nfor fd in map(int, os.listdir('/proc/self/fd')):\n"
        "    for msg in (b'\\n0\\n', b'{\"ready\": []}\\n', b'{\"r\": 2}\\n' * 50, b'passed\\n'):\n"
        "        try:\n            os.write(fd, msg)\n        except OSError:\n            pass\n"),
    "preflood_answers": (  # queue an answer before the runner asks: still only a value the program gives
        "import os, json\nfor fd in map(int, os.listdir('/proc/self/fd')):\n"
        "    try:\n        os.write(fd, b'{\"r\": true}\\n' * 10)\n    except OSError:\n        pass\n"),
    "systemexit_0_in_call": "def f(x):\n    raise SystemExit(0)\n",
    "os_exit_0_in_call": "def f(x):\n    import os\n    os._exit(0)\n",
    "threading_excepthook": "import threading, os, sys\nthreading.excepthook = lambda a: os._exit(0)\n"
                            "sys.excepthook = lambda *a: os._exit(0)\n"
                            "threading.Thread(target=lambda: 1 / 0).start()\n",
    "settrace_skip_asserts": (
        "import sys\ndef tr(frame, event, arg):\n"
        "    if event == 'line' and frame.f_code.co_filename == 'tests.py':\n"
        "        try:\n            frame.f_lineno = frame.f_lineno + 1\n        except Exception:\n            pass\n"
        "    return tr\nsys.settrace(tr)\nimport threading\nthreading.settrace(tr)\n"),
    "always_equal_object": "class Eq:\n    def __eq__(self, o):\n        return True\n    __hash__ = object.__hash__\n"
                           "def f(x):\n    return Eq()\n",
    "always_equal_int_subclass": "class I(int):\n    def __eq__(self, o):\n        return True\n"
                                 "    __hash__ = int.__hash__\ndef f(x):\n    return I(0)\n",
    "raise_named_systemexit": "class SystemExit(Exception):\n    pass\ndef f(x):\n    raise SystemExit(0)\n",
    "kill_everything": "import os, signal\ndef f(x):\n    try:\n        os.kill(-1, signal.SIGKILL)\n"
                       "    except OSError:\n        pass\n    os.kill(os.getpid(), signal.SIGKILL)\n",
    "deep_nesting": "def f(x):\n    v = 2\n    for _ in range(10000):\n        v = [v]\n    return v\n",
    "huge_answer": "def f(x):\n    return 'x' * (40 * 2**20)\n",
    # names the tests read from the program's namespace: builtins and stdlib modules stay the runner's
    "shadow_builtins": "def abs(x):\n    return 0\ndef isinstance(*a):\n    return True\n"
                       "def len(x):\n    return 0\nValueError = None\n",
    "fake_math_module": "class math:\n    isclose = staticmethod(lambda *a, **k: True)\n"
                        "    fabs = staticmethod(lambda x: 0.0)\n",
    "gc_hunt_for_tests": "import gc\ndef f(x):\n    for o in gc.get_objects():\n"
                         "        if isinstance(o, dict) and '_tests' in o:\n            return o\n    return 0\n",
}


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forgery_never_passes(level, name):
    if name == "kill_everything" and not sandbox_mode(level).netns:
        pytest.skip("kill(-1) without a PID namespace, as the caller's user, would kill the test runner")
    prog = FORGERIES[name]
    program = prog if "def f(" in prog else WRONG + prog
    tests = FAILING_WITH.get(name, FAILING)
    r = check_program(program, tests, timeout_s=3, isolation=level)
    assert not r.passed and r.status != "passed", (name, r)


@pytest.mark.parametrize("level", LEVELS)
def test_program_never_sees_the_tests(level):
    """Expected values live only in the runner: neither the filesystem nor /proc shows the tests."""
    if level == "basic" and os.geteuid() == 0:
        pytest.skip("basic runs the program as the caller's user: as root it may read any process")
    marker = "MARK" + uuid.uuid4().hex
    tests = f"# {marker}\nassert f(1) == 2\n"
    prog = (
        f"import os\nhits = []\nmark = {marker[::-1]!r}[::-1].encode()\n"  # not the marker's own text
        "for top in ('/tmp', '/var/tmp', '/dev/shm', '/proc', os.getcwd()):\n"
        "    for d, dirs, files in os.walk(top):\n"
        "        if d.startswith('/proc/') and d.count('/') > 3:\n            dirs[:] = []\n"
        "        for n in files:\n            p = os.path.join(d, n)\n"
        "            try:\n                with open(p, 'rb') as fh:\n                    b = fh.read(1 << 20)\n"
        "                if mark in b:\n                    hits.append(p)\n"
        "            except Exception:\n                pass\n"
        "print('HITS', hits)\n" + WRONG)
    r = check_program(prog, tests, timeout_s=20, isolation=level)
    assert "HITS []" in r.stdout, r.stdout[-2000:]
    assert not r.passed


@pytest.mark.parametrize("level", LEVELS)
def test_honest_programs_pass(level):
    cases = [
        ("def f(x):\n    return 2 * x\n", "assert f(2) == 4\n"),
        ("import math\n\ndef area(r):\n    return math.pi * r * r\n",
         "def check(candidate):\n    assert abs(candidate(1) - math.pi) < 1e-9\n\ncheck(area)\n"),
        ("def g(xs):\n    return tuple(sorted(set(xs))), {'n': len(xs), (1, 2): None}, {1, 2}, b'ab', 1 + 2j\n",
         "t, d, s, b, c = g([3, 1, 3])\nassert t == (1, 3) and type(t) is tuple\n"
         "assert d == {'n': 3, (1, 2): None} and s == {1, 2} and b == b'ab' and c == 1 + 2j\n"),
        ("def h(x):\n    if x < 0:\n        raise ValueError('neg')\n    return x\n",
         # the program's exceptions reach the tests as one type, their name and message kept
         "try:\n    h(-1)\n    raise AssertionError('no raise')\nexcept Exception as e:\n"
         "    assert type(e).__name__ == 'ProgramError' and str(e) == 'ValueError: neg'\n"),
        ("class Acc:\n    def __init__(self, v):\n        self.v = v\n    def add(self, k):\n        self.v += k\n"
         "        return self.v\n",
         "a = Acc(1)\nassert a.add(2) == 3 and a.add(4) == 7 and a.v == 7\n"),
        ("def gen(n):\n    yield from range(n)\n", "assert list(gen(3)) == [0, 1, 2] and len(list(gen(0))) == 0\n"),
        ("K = [1, 2, 3]\nbig = 10 ** 40\nnan = float('nan')\n",
         "assert K == [1, 2, 3] and big == 10 ** 40 and nan != nan\n"),
        ("def f(x, *, scale=1):\n    print('called', x)\n    return x * scale\n", "assert f(3, scale=2) == 6\n"),
    ]
    for prog, tests in cases:
        r = check_program(prog, tests, timeout_s=5, isolation=level)
        assert r.passed, (prog, r)


def _bwrap_only(level):
    if level != "bwrap":
        pytest.skip(f"contained only by bubblewrap (level {level!r}, see the threat model)")


TEMP_LEVELS = [lv for lv in LEVELS if lv != "basic"]


@pytest.mark.parametrize("level", TEMP_LEVELS)
def test_temp_files_do_not_survive_the_sample(level):
    tag = uuid.uuid4().hex
    write = (f"import os\nfor d in ('/tmp', '/dev/shm', '/var/tmp'):\n"
             f"    with open(os.path.join(d, 'leak_{tag}'), 'wb') as fh:\n        fh.write(b'x' * 1000)\n"
             f"    os.makedirs(os.path.join(d, 'dir_{tag}', 'sub'), exist_ok=True)\n"
             f"    open(os.path.join(d, 'dir_{tag}', 'sub', 'f'), 'w').write('y')\n"
             "def f(x):\n    return 2\n")
    assert check_program(write, FAILING, isolation=level).passed
    read = (f"import os\nfound = [p for d in ('/tmp', '/dev/shm', '/var/tmp') for p in "
            f"(os.path.join(d, 'leak_{tag}'), os.path.join(d, 'dir_{tag}')) if os.path.exists(p)]\n"
            "print('FOUND', found)\ndef f(x):\n    return 2\n")
    r = check_program(read, FAILING, isolation=level)
    assert r.passed and "FOUND []" in r.stdout, r
    for d in ("/tmp", "/dev/shm", "/var/tmp"):
        assert not os.path.exists(os.path.join(d, f"leak_{tag}")) and not os.path.exists(os.path.join(d, f"dir_{tag}"))


@pytest.mark.parametrize("level", LEVELS)
def test_host_unix_sockets_unreachable(level, tmp_path):
    _bwrap_only(level)
    path = tmp_path / "host.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    os.chmod(path, 0o777)
    os.chmod(tmp_path, 0o755)
    srv.listen(4)
    srv.settimeout(0.5)
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind("\0score_sbx_test_" + uuid.uuid4().hex)
    abstract.listen(4)
    abstract.settimeout(0.5)
    name = abstract.getsockname()
    prog = ("import socket\nfor addr in (%r, %r, '/run/dbus/system_bus_socket', '/var/run/docker.sock'):\n"
            "    try:\n        s = socket.socket(socket.AF_UNIX)\n        s.connect(addr)\n"
            "        s.sendall(b'hello from sandbox')\n        print('CONNECTED', addr)\n"
            "    except OSError as e:\n        print('refused', addr, e)\n" % (str(path), name)) + WRONG
    try:
        r = check_program(prog, FAILING, isolation=level)
        assert "CONNECTED" not in r.stdout, r.stdout
        for s in (srv, abstract):
            with pytest.raises(socket.timeout):
                s.accept()
    finally:
        srv.close()
        abstract.close()


@pytest.mark.parametrize("level", LEVELS)
def test_host_proc_invisible(level):
    _bwrap_only(level)
    bystander = subprocess.Popen(["sleep", "31.25"], stdin=subprocess.DEVNULL)  # another job on the host
    try:
        prog = ("import os\nseen = []\nfor p in os.listdir('/proc'):\n    if p.isdigit():\n"
                "        try:\n            seen.append(open('/proc/%s/cmdline' % p, 'rb').read().replace(b'\\0', b' '))\n"
                "        except OSError:\n            pass\n"
                "print('NPIDS', sum(p.isdigit() for p in os.listdir('/proc')))\nprint('CMDLINES', seen)\n" + WRONG)
        r = check_program(prog, FAILING, isolation=level)
        assert "sleep" not in r.stdout and "pytest" not in r.stdout, r.stdout
        assert int(r.stdout.split("NPIDS ", 1)[1].split("\n", 1)[0]) <= 3, r.stdout  # bwrap's init, python
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.parametrize("level", LEVELS)
def test_no_new_user_namespace(level):
    _bwrap_only(level)
    prog = ("import subprocess, ctypes, os\n"
            "r = subprocess.run(['unshare', '-r', 'id', '-u'], capture_output=True, text=True)\n"
            "print('UNSHARE', r.returncode, r.stdout.strip())\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "print('SYSCALL', libc.unshare(0x10000000), ctypes.get_errno())\n"  # CLONE_NEWUSER
            "print('UID', os.getuid())\n" + WRONG)
    r = check_program(prog, FAILING, isolation=level)
    assert "UNSHARE 0" not in r.stdout and "SYSCALL -1" in r.stdout and "UID 65534" in r.stdout, r


@pytest.mark.parametrize("level", [lv for lv in LEVELS if lv != "basic"])
def test_concurrent_fork_bomb_does_not_fail_an_honest_sample(level):
    bomb = ("import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
            "        time.sleep(0.001)\n" + WRONG)
    honest = ("import subprocess\nouts = [subprocess.run(['true']).returncode for _ in range(8)]\n"
              "import os\nkids = []\nfor _ in range(8):\n    pid = os.fork()\n    if pid == 0:\n        os._exit(0)\n"
              "    kids.append(pid)\nfor k in kids:\n    os.waitpid(k, 0)\n"
              "def f(x):\n    return 2 * x\n")
    results = {}
    t = threading.Thread(target=lambda: results.setdefault("bomb", check_program(bomb, FAILING, timeout_s=6,
                                                                                  isolation=level)))
    t.start()
    try:
        time.sleep(1.0)  # the bomb has used up its own process limit by now
        for i in range(3):
            r = check_program(honest, "assert f(2) == 4\n", timeout_s=5, isolation=level)
            assert r.passed, (i, r)
    finally:
        t.join()
    assert not results["bomb"].passed
    time.sleep(0.3)
    left = [p for p in os.listdir("/proc") if p.isdigit() and _uid_of(p) is not None
            and sbx._UID_BASE <= _uid_of(p) < sbx._UID_BASE + 2 * sbx._UID_SLOTS]
    assert left == []


def _uid_of(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:") and line.split()[1] == "Z":
                    return None  # a zombie holds nothing; its parent reaps it
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def test_isolation_level_is_announced_once(capfd):
    sbx._announced.clear()
    for _ in range(2):
        check_program("def f(x):\n    return 2\n", FAILING, isolation="basic")
    err = capfd.readouterr().err
    assert err.count("isolation level 'basic'") == 1


def test_unknown_isolation_level():
    with pytest.raises(ValueError, match="isolation"):
        check_program(WRONG, FAILING, isolation="docker")
