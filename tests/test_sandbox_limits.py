"""Limits that hold per sample, not per process (issue 32, classes 3 to 6): memory across processes and
shared memory, writable storage, the keyrings, SysV IPC and world-writable directories. Each sample
here stays within a few hundred MB of the limit under test."""
import ctypes
import os
import platform
import subprocess
import uuid

import pytest

from score_train.rewards.code import check_program, sandbox_mode
from score_train.rewards.sandbox import memory_level
from tests.test_sandbox_attacks import LEVELS, TEMP_LEVELS

GOOD = "def f(x):\n    return 2 * x\n"
TESTS = "assert f(2) == 4\n"
LIMIT_MB = 256


def _needs_cgroup():
    mem = memory_level()
    if mem.parent is None:
        pytest.skip(f"no memory cgroup can be made here: {mem.why}")


# Each holds about 1.4x LIMIT_MB in all while no process goes over its own address-space limit.
OVER_MEMORY = {
    # three children of 120 MB each; the parent waits until all three hold their memory
    "processes": ("import os, time\nr, w = os.pipe()\nfor _ in range(3):\n    if os.fork() == 0:\n"
                  "        b = b'x' * (120 * 2**20)\n        os.write(w, b'.')\n        time.sleep(30)\n"
                  "        os._exit(0)\nn = 0\nwhile n < 3:\n    n += len(os.read(r, 3))\n"),
    # memfd pages are mapped by no one, so no address-space limit sees them (15 MB each: RLIMIT_FSIZE)
    "memfd": ("import os\nchunk = b'x' * 2**20\nfds = [os.memfd_create('m%d' % i) for i in range(24)]\n"
              "for fd in fds:\n    for _ in range(15):\n        os.write(fd, chunk)\n"),
    # tmpfs files and memfds together, each below every per-file and per-mount cap
    "tmpfs_and_memfd": ("import os\nchunk = b'x' * 2**20\nfor i in range(3):\n"
                        "    with open(os.path.join(os.environ['TMPDIR'], 'f%d' % i), 'wb') as fh:\n"
                        "        for _ in range(15):\n            fh.write(chunk)\n"
                        "fds = [os.memfd_create('m%d' % i) for i in range(20)]\n"
                        "for fd in fds:\n    for _ in range(15):\n        os.write(fd, chunk)\n"),
}


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", sorted(OVER_MEMORY))
def test_memory_is_limited_per_sample(level, name):
    _needs_cgroup()
    r = check_program(OVER_MEMORY[name] + GOOD, TESTS, timeout_s=20, memory_mb=LIMIT_MB, isolation=level)
    assert r.status == "memory" and not r.passed, (name, r)
    assert r.wall_s < 6, r  # ended by the OOM kill, not by the 20 s timeout
    # the same program within its memory passes
    small = OVER_MEMORY[name].replace("120 *", "40 *").replace("range(24)", "range(4)").replace("range(20)", "range(4)")
    r = check_program(small + GOOD, TESTS, timeout_s=20, memory_mb=LIMIT_MB, isolation=level)
    assert r.passed, (name, r)
    assert not [d for d in os.listdir(memory_level().parent) if d.startswith(f"score_sbx_{os.getpid()}_")]


def test_memory_level_is_said_once(capfd):
    from score_train.rewards import sandbox
    sandbox._announced.discard("memory")
    for _ in range(2):
        check_program(GOOD, TESTS)
    err = capfd.readouterr().err
    assert err.count("memory limit per sample: " + memory_level().level) == 1, err


_WRITE_EVERYWHERE = (
    "import os\nwrote = []\nfor d in ('/', '/etc', '/var', '/run', '/home', '/opt', '/dev', '/usr', '/x/y'):\n"
    "    for make in (lambda p: open(p, 'wb').write(b'x' * 4096), os.mkdir):\n"
    "        p = os.path.join(d, 'w%d' % id(make))\n        try:\n            os.makedirs(d, exist_ok=True)\n"
    "            make(p)\n            wrote.append(p)\n        except OSError:\n            pass\n"
    "print('WROTE', wrote)\n"
    "rw = [ln.split()[:4] for ln in open('/proc/self/mounts') if 'rw' in ln.split()[3].split(',')]\n"
    "print('RW', [m for m in rw if m[2] not in ('proc', 'devpts') and not (m[2] == 'devtmpfs' and "
    "m[1] in ('/dev/null', '/dev/zero', '/dev/full', '/dev/random', '/dev/urandom', '/dev/tty')) "
    "and not (m[2] == 'tmpfs' and any(o.startswith('size=') for o in m[3].split(',')))])\n")


@pytest.mark.parametrize("level", LEVELS)
def test_no_write_outside_capped_mounts(level):
    """bubblewrap's own root and /dev are read-only; every writable mount left has a size cap."""
    if level != "bwrap":
        pytest.skip(f"level {level!r} runs on the host's file system (see the threat model)")
    r = check_program(_WRITE_EVERYWHERE + GOOD, TESTS, isolation=level)
    assert r.passed and "WROTE []" in r.stdout and "RW []" in r.stdout, r


# keyctl(2) and add_key(2) by machine: (SYS_add_key, SYS_keyctl)
_SYSCALLS = {"x86_64": (248, 250), "aarch64": (217, 219)}
_SESSION, _USER, _USER_SESSION = -3, -4, -5


def _keys():
    if platform.machine() not in _SYSCALLS:
        pytest.skip(f"keyring system call numbers unknown for {platform.machine()}")
    return ctypes.CDLL(None, use_errno=True), _SYSCALLS[platform.machine()]


_KEY_PROBE = (
    "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nADD, KEYCTL = {nrs}\n"
    "got = []\nfor ring in (-3, -4, -5):\n"
    "    kid = libc.syscall(KEYCTL, 10, ring, b'user', b'{want}', 0)\n"  # KEYCTL_SEARCH
    "    if kid > 0:\n        buf = ctypes.create_string_buffer(256)\n"
    "        n = libc.syscall(KEYCTL, 11, kid, buf, 256)\n"  # KEYCTL_READ
    "        got.append((ring, buf.raw[:max(n, 0)]))\n"
    "    if libc.syscall(ADD, b'user', b'{plant}', b'planted', 7, ring) > 0:\n"
    "        got.append(('planted', ring))\n"
    "try:\n    listed = [ln for ln in open('/proc/keys') if '{want}' in ln]\n"
    "except OSError:\n    listed = []\nprint('GOT', got)\nprint('LISTED', listed)\n")


@pytest.mark.parametrize("level", LEVELS)
def test_keyrings_are_out_of_reach(level):
    """A key in the caller's session keyring cannot be read, and a key one sample plants cannot be
    found by the next (session, user and user-session keyrings)."""
    libc, (add_key, keyctl) = _keys()
    # a fresh session keyring for this process, so the test's key lands in no keyring others share
    if libc.syscall(keyctl, 1, None) < 0:  # KEYCTL_JOIN_SESSION_KEYRING
        pytest.skip("no session keyring can be joined here")
    tag = uuid.uuid4().hex
    secret = b"hunter2-" + tag[:8].encode()
    kid = libc.syscall(add_key, b"user", f"score_secret_{tag}".encode(), secret, len(secret), _SESSION)
    assert kid > 0, ctypes.get_errno()
    try:
        nrs = repr(_SYSCALLS[platform.machine()])
        first = check_program(_KEY_PROBE.format(nrs=nrs, want=f"score_secret_{tag}", plant=f"score_plant_{tag}")
                              + GOOD, TESTS, isolation=level)
        assert first.passed and "GOT []" in first.stdout and "hunter2" not in first.stdout, first
        if sandbox_mode(level).drop_user:  # another uid: not even the key's name is listed
            assert "LISTED []" in first.stdout, first
        second = check_program(_KEY_PROBE.format(nrs=nrs, want=f"score_plant_{tag}", plant=f"score_plant2_{tag}")
                               + GOOD, TESTS, isolation=level)
        assert second.passed and "GOT []" in second.stdout and "LISTED []" in second.stdout, second
    finally:
        libc.syscall(keyctl, 3, kid)  # KEYCTL_REVOKE
    for ring in (_SESSION, _USER, _USER_SESSION):
        assert libc.syscall(keyctl, 10, ring, b"user", f"score_plant_{tag}".encode(), 0) < 0


def _world_writable():
    out = subprocess.run(["find", "/", "-xdev", "-type", "d", "-perm", "-0002"], capture_output=True,
                         text=True, timeout=60).stdout.split()
    return sorted(set(out) | {d for d in ("/dev/shm", "/run/lock") if os.path.isdir(d)})


_IPC_PROBE = (
    "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nKEY, MAKE = {key}, {make}\n"
    "flags = 0o1666 if MAKE else 0\n"  # IPC_CREAT | rw for all
    "found = [name for name, rid in (('shm', libc.shmget(KEY, 4096, flags)), ('msg', libc.msgget(KEY, flags)),"
    " ('sem', libc.semget(KEY, 1, flags))) if rid >= 0]\n"
    "for d in {dirs!r}:\n    p = os.path.join(d, 'left_{tag}')\n"
    "    if MAKE:\n        try:\n            open(p, 'w').write('x')\n        except OSError:\n            pass\n"
    "    elif os.path.exists(p):\n        found.append(p)\n"
    "print('FOUND', found)\n")


@pytest.mark.parametrize("level", TEMP_LEVELS)
def test_no_ipc_or_files_left_for_the_next_sample(level):
    """SysV shared memory, message queues and semaphores, and files in any world-writable directory,
    made by one sample, are gone for the next."""
    dirs, tag = _world_writable(), uuid.uuid4().hex
    key = 0x5C000000 + int(tag[:6], 16)
    made = check_program(_IPC_PROBE.format(key=key, make=1, dirs=dirs, tag=tag) + GOOD, TESTS, isolation=level)
    assert made.passed and "'shm', 'msg', 'sem'" in made.stdout, made
    seen = check_program(_IPC_PROBE.format(key=key, make=0, dirs=dirs, tag=tag) + GOOD, TESTS, isolation=level)
    assert seen.passed and "FOUND []" in seen.stdout, (dirs, seen)
    with open("/proc/sysvipc/shm") as f:
        assert not any(line.split()[0] == str(key) for line in f.readlines()[1:])
    assert not [d for d in dirs if os.path.exists(os.path.join(d, f"left_{tag}"))]


def test_fallback_levels_stated():
    assert sandbox_mode().level in ("bwrap", "namespaces", "basic")
    assert memory_level().level in ("cgroup2", "cgroup1", "rlimit")


def test_without_a_cgroup_per_process_limits_hold(monkeypatch, capfd):
    """Where no cgroup can be made, RLIMIT_AS still holds per process, and the sandbox says so."""
    from score_train.rewards import sandbox
    from score_train.rewards._cgroup import MemoryLevel
    monkeypatch.setattr(sandbox, "memory_level", lambda: MemoryLevel("rlimit", None, "forced by the test"))
    monkeypatch.setattr(sandbox, "_announced", set())
    assert check_program(GOOD, TESTS).passed
    assert check_program("x = bytearray(10 * 2**30)\n" + GOOD, TESTS, memory_mb=LIMIT_MB).status == "memory"
    assert "memory limit per sample: rlimit, per process only (RLIMIT_AS): forced by the test" in capfd.readouterr().err


def test_cgroup2_parent_is_the_nearest_delegating_ancestor(tmp_path, monkeypatch):
    """The v2 path on a fake hierarchy (this machine's v2 tree has no memory controller): children go
    below the nearest cgroup at or above ours that hands `memory` down, with memory.max and no swap."""
    from score_train.rewards import _cgroup
    root = tmp_path / "cg"
    own = root / "user.slice" / "session.scope"
    own.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    for d, ctl in ((root, "cpu memory pids"), (root / "user.slice", "memory pids"), (own, "")):
        (d / "cgroup.subtree_control").write_text(ctl + "\n")
    monkeypatch.setattr(_cgroup, "_mounts", lambda: [("cgroup2", str(root), set())])
    monkeypatch.setattr(_cgroup, "_own_paths", lambda: {"2": "/user.slice/session.scope"})
    mem = _cgroup.memory_level.__wrapped__()
    assert mem.level == "cgroup2" and mem.parent == str(root / "user.slice"), mem
    cg = _cgroup.SampleCgroup(mem, 300 * 2**20)
    assert (open(cg.path + "/memory.max").read(), open(cg.path + "/memory.swap.max").read()) == (str(300 * 2**20), "0")
    assert cg.enter()[-1] == cg.path + "/cgroup.procs" and not cg.oom_killed()
    with open(cg.path + "/memory.events", "w") as f:
        f.write("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert cg.oom_killed()
    (root / "user.slice" / "cgroup.subtree_control").write_text("pids\n")
    assert _cgroup.memory_level.__wrapped__().parent == str(root)  # the next one up
    (root / "cgroup.subtree_control").write_text("cpu\n")  # nothing delegates memory: no v2
    assert _cgroup.memory_level.__wrapped__().level != "cgroup2"
