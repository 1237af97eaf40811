"""The code sandbox contains every attack of the issue list, scores it as not passed, and leaves the
calling process and files outside its temporary directory untouched."""
import os
import signal
import socket
import sys
import time

import pytest

from score_train.rewards import sandbox as sbx
from score_train.rewards.code import build_program, check_program, extract_code, sandbox_mode

TESTS = "assert f(2) == 4\n"
GOOD = "def f(x):\n    return 2 * x\n"
STRONG = sandbox_mode().netns and sandbox_mode().drop_user


@pytest.fixture
def workdirs(monkeypatch):
    """Records each sandbox's temporary directory."""
    made = []
    real = sbx.tempfile.mkdtemp

    def mkdtemp(*a, **k):
        made.append(real(*a, **k))
        return made[-1]

    monkeypatch.setattr(sbx.tempfile, "mkdtemp", mkdtemp)
    return made


def _procs_in(path):
    """Processes whose working directory is (or was) path."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.readlink(f"/proc/{pid}/cwd").split(" (deleted)")[0] == path:
                    out.append(int(pid))
            except OSError:
                pass
    return out


def test_strong_isolation_where_root():
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("namespaces and setpriv need root")
    mode = sandbox_mode()
    assert mode.netns and mode.drop_user, mode


def test_pass_fail_error():
    r = check_program(GOOD + "print('hello')\n", TESTS)
    assert r.passed and r.status == "passed" and r.stdout == "hello" and r.wall_s < 5
    r = check_program("def f(x):\n    return x + 3\n", TESTS)
    assert not r.passed and r.status == "failed" and "AssertionError" in r.stderr
    r = check_program("def f(x) return", TESTS)
    assert not r.passed and r.status == "error" and "SyntaxError" in r.stderr
    r = check_program("def f(x):\n    return 1 / 0\n", TESTS)
    assert r.status == "error" and "ZeroDivisionError" in r.stderr


def test_infinite_loop(workdirs):
    t = time.monotonic()
    r = check_program("while True:\n    pass\n" + GOOD, TESTS, timeout_s=1.0)
    assert r.status == "timeout" and not r.passed
    assert time.monotonic() - t < 5
    assert not os.path.exists(workdirs[-1])


def test_sleeping_program_times_out():
    r = check_program("import time\ntime.sleep(100)\n" + GOOD, TESTS, timeout_s=0.5)
    assert r.status == "timeout" and r.wall_s < 4


def test_fork_bomb(workdirs):
    t = time.monotonic()
    r = check_program("import os\nwhile True:\n    os.fork()\n" + GOOD, TESTS, timeout_s=3.0)
    assert not r.passed and r.status in ("error", "timeout")
    assert time.monotonic() - t < 10
    time.sleep(0.2)
    assert _procs_in(workdirs[-1]) == []


def test_detached_children_are_killed(workdirs):
    # Children that leave the process group and outlive the program must not survive the sandbox.
    prog = ("import os, time\nfor _ in range(4):\n    if os.fork() == 0:\n        os.setsid()\n"
            "        time.sleep(60)\n        os._exit(0)\n" + GOOD)
    r = check_program(prog, TESTS, timeout_s=3.0)
    assert r.passed  # the program itself is right
    time.sleep(0.3)
    left = _procs_in(workdirs[-1])
    if not sandbox_mode().netns:
        for pid in left:  # without a PID namespace setsid escapes the group kill: clean up, then skip
            os.kill(pid, signal.SIGKILL)
        pytest.skip("needs a PID namespace")
    assert left == []


def test_forked_child_cannot_report_success():
    r = check_program("import os\nif os.fork():\n    os._exit(1)\n" + GOOD, TESTS)
    assert not r.passed


def test_ten_gigabyte_allocation():
    r = check_program("x = bytearray(10 * 2**30)\n" + GOOD, TESTS, memory_mb=512)
    assert r.status == "memory" and not r.passed
    r = check_program("x = [0] * (10**10 // 8)\n" + GOOD, TESTS, memory_mb=512)
    assert r.status == "memory" and not r.passed


def test_rm_rf_home_and_absolute_deletion(tmp_path, workdirs):
    canary_dir = tmp_path / "outside"
    canary_dir.mkdir()
    canary = canary_dir / "canary.txt"
    canary.write_text("still here")
    prog = (
        "import os, shutil\n"
        "os.system('rm -rf ~ 2>/dev/null')\n"
        "os.system('rm -rf ~/ /root /work 2>/dev/null')\n"
        f"shutil.rmtree({str(canary_dir)!r}, ignore_errors=True)\n"
        f"try:\n    os.remove({str(canary)!r})\nexcept OSError:\n    pass\n"
        "def f(x):\n    return x\n"
    )
    r = check_program(prog, TESTS, timeout_s=5)
    assert not r.passed
    if not sandbox_mode().drop_user:
        pytest.skip("absolute-path deletion is only contained when running as another user")
    assert canary.read_text() == "still here"
    assert os.path.exists(os.path.expanduser("~")) and os.path.isdir(os.getcwd())
    assert not os.path.exists(workdirs[-1])


def test_home_is_the_temp_dir():
    prog = "import os\nprint(os.path.expanduser('~'), os.getcwd())\n" + GOOD
    r = check_program(prog, TESTS)
    home, cwd = r.stdout.split()
    assert home == cwd and os.path.basename(home).startswith("score_sbx_")


def test_socket_connection():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.5)
    port = srv.getsockname()[1]
    prog = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "s.sendall(b'leak')\n" + GOOD)
    try:
        r = check_program(prog, TESTS, timeout_s=5)
        assert not r.passed and r.status == "error"
        with pytest.raises(socket.timeout):
            srv.accept()
    finally:
        srv.close()
    # an outside address fails the same way
    r = check_program("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)\n" + GOOD, TESTS)
    assert not r.passed


def test_environment_secrets(monkeypatch):
    monkeypatch.setenv("SCORE_TEST_SECRET", "hunter2-secret-value")
    prog = (
        "import os, glob\n"
        "print(dict(os.environ))\n"
        "for p in glob.glob('/proc/*/environ'):\n"
        "    try:\n        print(open(p, 'rb').read())\n    except OSError:\n        pass\n"
        "assert 'SCORE_TEST_SECRET' in os.environ\n" + GOOD
    )
    r = check_program(prog, TESTS)
    assert not r.passed
    if sandbox_mode().drop_user:  # the same user could read its parent's /proc/PID/environ
        assert "hunter2" not in r.stdout and "hunter2" not in r.stderr
    r = check_program("import os\nprint(sorted(os.environ))\n" + GOOD, TESTS)
    assert r.passed and "SCORE_TEST_SECRET" not in r.stdout


@pytest.mark.parametrize("exit_call", ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "exit(0)",
                                       "raise SystemExit"])
def test_exit_before_tests(exit_call):
    r = check_program(exit_call + "\n" + "def f(x):\n    return x\n", TESTS)
    assert not r.passed and r.status == "failed"


def test_exit_inside_tests_is_not_a_pass():
    r = check_program("def f(x):\n    import sys\n    sys.exit(0)\n", TESTS)
    assert not r.passed


def test_forged_success_line():
    r = check_program(GOOD + "print('passed')\nimport os\nos._exit(0)\n", "assert f(2) == 5\n")
    assert not r.passed


def test_cannot_signal_the_caller():
    if not sandbox_mode().drop_user:
        pytest.skip("kill(-1) as the same user would kill the test runner")
    prog = f"import os, signal\ntry:\n    os.kill({os.getpid()}, signal.SIGKILL)\nexcept OSError:\n    pass\n" \
           "try:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass\n" + GOOD
    r = check_program(prog, TESTS)
    assert r.status in ("passed", "error", "failed")  # it may kill itself; never us
    assert os.getpid() > 0


def test_big_output_is_capped():
    r = check_program("print('x' * 10_000_000)\n" + GOOD, TESTS)
    assert len(r.stdout) <= 70_000


def test_basic_mode(monkeypatch):
    """The fallback without namespaces or setpriv: socket module blocked, env empty, limits still on."""
    mode = sandbox_mode("basic")
    assert not mode.netns and not mode.drop_user and mode.python == sys.executable and mode.level == "basic"
    monkeypatch.setenv("SCORE_TEST_SECRET", "hunter2")
    basic = {"isolation": "basic"}
    assert check_program(GOOD, TESTS, **basic).passed
    r = check_program("import socket\nsocket.socket()\n" + GOOD, TESTS, **basic)
    assert r.status == "error" and "network is disabled" in r.stderr
    assert check_program("while True: pass\n", TESTS, timeout_s=1, **basic).status == "timeout"
    assert check_program("x = bytearray(10 * 2**30)\n", TESTS, memory_mb=512, **basic).status == "memory"
    assert check_program("import sys; sys.exit(0)\n", TESTS, **basic).status == "failed"
    r = check_program("import os\nassert 'SCORE_TEST_SECRET' not in os.environ\n" + GOOD, TESTS, **basic)
    assert r.passed


def test_bad_arguments():
    with pytest.raises(ValueError, match="timeout_s"):
        check_program(GOOD, TESTS, timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        check_program(GOOD, TESTS, memory_mb=1)


def test_extract_and_build():
    text = "Here:\n```python\ndef f(x):\n    return 1\n```\nbetter:\n```python\ndef f(x):\n    return 2 * x\n```"
    assert extract_code(text) == "def f(x):\n    return 2 * x\n"
    assert extract_code("```\nprint(1)\n```") == "print(1)\n"
    assert extract_code("```python\nx = 1\n") == "x = 1\n"  # unclosed fence at the end
    assert extract_code("plain code") == "plain code" and extract_code(None) == ""
    prompt = "from typing import List\n\ndef g(xs: List[int]) -> int:\n    \"\"\"Sum.\"\"\"\n"
    full = build_program("def g(xs):\n    return sum(xs)\n", prompt, "g")
    assert full.startswith(prompt.rstrip()) and full.endswith("def g(xs):\n    return sum(xs)\n")
    assert check_program(full, "assert g([1, 2]) == 3\n").passed
    # helpers defined in the prompt stay available when the model rewrites only the entry point
    helper = "def h(x):\n    return x + 1\n\n\ndef g(x):\n    \"\"\"Uses h.\"\"\"\n"
    assert check_program(build_program("def g(x):\n    return h(x) * 2\n", helper, "g"), "assert g(1) == 4\n").passed
    # a prompt that is prose, not code: only its import lines are kept
    prose = "import math\nWrite g, the square root.\n"
    assert build_program("def g(x):\n    return math.sqrt(x)\n", prose, "g") == "import math\n\ndef g(x):\n    return math.sqrt(x)\n"
    assert build_program("    return sum(xs)\n", prompt, "g") == prompt + "    return sum(xs)\n"
