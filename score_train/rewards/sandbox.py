"""Containment of one sample: what the sandboxed processes can see, touch and use.

Isolation levels, strongest available on the machine (`sandbox_mode()`; said once on stderr when it is
not bubblewrap):
- "bwrap": bubblewrap (unprivileged user, mount, PID, IPC, network, UTS namespaces; as root first a
  per-sample uid). A read-only root and /dev; only /usr (and the interpreter) visible, read-only;
  private size-capped tmpfs /tmp, /dev/shm and /var/tmp (the work dir is in /tmp) are the only
  writable mounts and vanish with the sample; a private /proc; no network; no new user namespaces;
  killed with its parent.
- "namespaces": root without bubblewrap: `unshare -m -n -p -i -f --mount-proc --kill-child` (private
  network, PID and IPC namespaces and /proc) plus `setpriv` to a per-sample uid; files that uid leaves in
  any world-writable directory are deleted afterwards.
- "basic": neither: the socket module is blocked, the environment emptied, limits set.
Every level: a memory cgroup per sample where one can be made (_cgroup.py; the level in force is said
once), resource limits per process (CPU, address space, files, processes, file size), the keyring
system calls refused by a seccomp filter (_seccomp.py), an empty environment, `python -I`.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from score_train.rewards._cgroup import MemoryLevel, SampleCgroup, memory_level

ISOLATION_LEVELS = ("bwrap", "namespaces", "basic")  # strongest first
NOBODY = 65534
_HERE = os.path.dirname(os.path.abspath(__file__))
FILES = {"candidate": ("_harness.py", "_wire.py", "_seccomp.py"), "runner": ("_runner.py", "_wire.py")}
_TMPFS_BYTES = 64 * 2**20
# Per-sample uids (root only): two per slot, far above any real account. A distinct uid per sample
# keeps RLIMIT_NPROC, signals and file access of concurrent samples apart.
_UID_BASE = 1_000_000
_UID_SLOTS = 4096


@dataclass(frozen=True)
class SandboxMode:
    level: str  # one of ISOLATION_LEVELS
    netns: bool  # a private network and PID namespace
    drop_user: bool  # runs as a per-sample uid (root)
    python: str
    why: str = ""  # why a stronger level is not available


def _ok(cmd, **kw) -> bool:
    try:
        return subprocess.run(cmd, env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=20, **kw).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _setpriv(uid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]


def _bwrap(python: str, files: dict[str, str], workdir: str, uid: int | None) -> list[str]:
    """The bubblewrap command line: files {name: host path} appear read-only in workdir (cwd, HOME)."""
    cmd = _setpriv(uid) if uid is not None else []
    cmd += ["bwrap", "--ro-bind", "/usr", "/usr"]
    for link in ("bin", "lib", "lib64", "sbin"):
        p = "/" + link
        if os.path.islink(p):
            cmd += ["--symlink", os.readlink(p), p]
        elif os.path.isdir(p):
            cmd += ["--ro-bind", p, p]
    for p in ("/etc/ld.so.cache", "/etc/localtime"):
        cmd += ["--ro-bind-try", p, p]
    real = os.path.realpath(python)
    extra = {os.path.dirname(real)}
    if os.path.realpath(sys.executable) == real:
        extra.add(os.path.realpath(sys.base_prefix))
    for p in sorted(extra):
        if not (p + "/").startswith("/usr/"):  # an interpreter outside /usr (a non-root user's own Python)
            cmd += ["--ro-bind-try", p, p]
    cmd += ["--dev", "/dev", "--proc", "/proc"]
    for p in ("/tmp", "/dev/shm", "/var/tmp"):
        cmd += ["--size", str(_TMPFS_BYTES), "--tmpfs", p]
    cmd += ["--dir", workdir]
    for name, src in files.items():
        cmd += ["--ro-bind", src, f"{workdir}/{name}"]
    # bubblewrap's own root and /dev are tmpfs without a size cap: read-only once everything is mounted
    # (a remount is not recursive, so the capped tmpfs mounts above stay writable)
    cmd += ["--remount-ro", "/dev", "--remount-ro", "/"]
    cmd += ["--chdir", workdir, "--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(NOBODY),
            "--gid", str(NOBODY), "--die-with-parent", "--new-session", "--clearenv",
            "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", workdir, "--setenv", "TMPDIR", workdir,
            "--setenv", "LANG", "C.UTF-8", "--"]
    return cmd


_UNSHARE = ["unshare", "-m", "-n", "-p", "-i", "-f", "--mount-proc", "--kill-child"]


def _python_candidates() -> list[str]:
    # The sandboxed user must be able to read its interpreter (a venv under /root is not readable).
    # SCORE_SANDBOX_PYTHON (documented) picks another stdlib-only interpreter for the sandbox.
    return [c for c in (os.environ.get("SCORE_SANDBOX_PYTHON"), "/usr/bin/python3", sys.executable) if c]


def _probe(level: str) -> tuple[str | None, str]:
    """(interpreter that works at this level, or None; why not)."""
    root = _is_root()
    if level == "bwrap":
        if shutil.which("bwrap") is None:
            return None, "bubblewrap (bwrap) is not installed"
        if root and shutil.which("setpriv") is None:
            return None, "setpriv is missing"
        for cand in _python_candidates():
            if _ok(_bwrap(cand, {}, "/tmp/score_sbx_probe", NOBODY if root else None)
                   + [cand, "-I", "-c", "import json, resource, socket"]):
                return cand, ""
        return None, "bwrap cannot start a sandbox here (user namespaces disabled?)"
    if level == "namespaces":
        if not root:
            return None, "namespaces and setpriv need root"
        if not (shutil.which("unshare") and shutil.which("setpriv") and _ok(_UNSHARE + ["true"])):
            return None, "unshare -m -n -p -i --mount-proc failed"
        for cand in _python_candidates():
            if _ok(_setpriv(NOBODY) + [cand, "-I", "-c", "import resource, json"]):
                return cand, ""
        return None, "no interpreter readable by nobody"
    return sys.executable, ""


_announced: set[str] = set()
_announce_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def sandbox_mode(isolation: str | None = None) -> SandboxMode:
    """The isolation this machine allows, probed once per process: the strongest of
    ISOLATION_LEVELS, or exactly `isolation` (RuntimeError where it is not available)."""
    if isolation is not None and isolation not in ISOLATION_LEVELS:
        raise ValueError(f"isolation must be one of {ISOLATION_LEVELS} or None, got {isolation!r}")
    why = []
    for level in ISOLATION_LEVELS if isolation is None else (isolation,):
        python, reason = _probe(level)
        if python is not None:
            root = _is_root()
            return SandboxMode(level=level, netns=level != "basic", drop_user=root and level != "basic",
                               python=python, why="; ".join(why))
        why.append(f"{level}: {reason}")
    raise RuntimeError(f"isolation {isolation!r} is not available on this machine ({'; '.join(why)})")


def _say_once(key: str, text: str) -> None:
    with _announce_lock:
        if key in _announced:
            return
        _announced.add(key)
    sys.stderr.write(text)
    sys.stderr.flush()


def announce(mode: SandboxMode) -> None:
    """Say once per process, on stderr, which memory limit is in force, and when the sandbox runs
    below bubblewrap."""
    mem = memory_level()
    _say_once("memory", f"score sandbox: memory limit per sample: {mem.level}"
              + (f" ({mem.parent})" if mem.parent else f", per process only (RLIMIT_AS): {mem.why}") + "\n")
    if mode.level != "bwrap":
        _say_once(mode.level, f"score sandbox: running model-written code at isolation level {mode.level!r}, "
                  f"not 'bwrap' ({mode.why or 'forced by the caller'}); see docs/tasks-rewards-eval.md. "
                  "`apt-get install bubblewrap` (scripts/setup.sh does it as root) gives the strongest.\n")


@contextlib.contextmanager
def _uid_pair():
    """Two uids no other running sample holds (a flock per slot, so across processes too)."""
    d = os.path.join(tempfile.gettempdir(), "score_sbx_uids")
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise RuntimeError(f"{d} is not a private directory of this user")
    start = secrets.randbelow(_UID_SLOTS)
    for i in range(_UID_SLOTS):
        slot = (start + i) % _UID_SLOTS
        fd = os.open(os.path.join(d, f"{slot}.lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        try:
            yield _UID_BASE + 2 * slot, _UID_BASE + 2 * slot + 1
        finally:
            os.close(fd)
        return
    raise RuntimeError("no free sandbox uid slot")


@functools.lru_cache(maxsize=1)
def world_writable_dirs() -> tuple[str, ...]:
    """Directories any uid may create files in (namespaces level: swept after each sample), found once
    per process. A directory others cannot search hides all below it, so the walk stops there."""
    found, todo = [], ["/"]
    while todo:
        try:
            it = os.scandir(todo.pop())
        except OSError:
            continue
        with it:
            for e in it:
                try:
                    if e.path in ("/proc", "/sys") or not e.is_dir(follow_symlinks=False):
                        continue
                    mode = e.stat(follow_symlinks=False).st_mode
                except OSError:
                    continue
                if mode & 0o002:
                    found.append(e.path)  # swept whole, so nothing below needs listing
                elif mode & 0o001:
                    todo.append(e.path)
    return tuple(sorted(found))


def _remove_files_of(uids: tuple[int, ...], tops) -> None:
    """namespaces level: what the sample's uids left in the shared world-writable directories."""
    for top in tops:
        for dirpath, dirnames, filenames in os.walk(top, topdown=True):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                if st.st_uid in uids:
                    if stat.S_ISDIR(st.st_mode):
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            os.unlink(p)
            dirnames[:] = [n for n in dirnames if os.path.isdir(os.path.join(dirpath, n))
                           and not os.path.islink(os.path.join(dirpath, n))]


def _kill_uids(uids: tuple[int, ...], timeout_s: float = 2.0) -> None:
    """SIGKILL every process that runs as one of the sample's own uids, until none is left: the
    group kill misses processes that left the group, and a PID namespace's teardown is not
    instant. Safe because no other process ever holds these uids (_uid_pair)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                st = os.stat(f"/proc/{pid}")
            except OSError:
                continue
            if st.st_uid in uids:
                try:
                    with open(f"/proc/{pid}/stat", "rb") as f:
                        if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                            continue  # a zombie holds no resources; its parent reaps it
                except (OSError, IndexError):
                    continue
                left += 1
                with contextlib.suppress(OSError):
                    os.kill(int(pid), signal.SIGKILL)
        if not left or time.monotonic() > deadline:
            return
        time.sleep(0.005)


class Sample:
    """One sample's private directories, uids and memory cgroup; `command` starts a side in them."""

    def __init__(self, mode: SandboxMode, memory: MemoryLevel):
        self.mode, self.memory = mode, memory
        self.dirs: dict[str, str] = {}
        self.uids: tuple[int, int] | None = None
        self.cgroup: SampleCgroup | None = None

    def stage(self, program: str) -> None:
        """One private directory per role, filled with its files (and solution.py for the candidate),
        owned by the role's uid when users are dropped."""
        base = "/tmp" if self.uids is not None and os.path.isdir("/tmp") else None
        for role in ("candidate", "runner"):
            # nobody must be able to reach the directory: a caller's TMPDIR may sit under a private home.
            d = self.dirs[role] = tempfile.mkdtemp(prefix="score_sbx_", dir=base)
            for name in FILES[role]:
                shutil.copyfile(os.path.join(_HERE, name), os.path.join(d, name))
        with open(os.path.join(self.dirs["candidate"], "solution.py"), "w", encoding="utf-8") as f:
            f.write(program)
        if self.uids is not None:
            for role, uid in zip(("candidate", "runner"), self.uids):
                for p in (self.dirs[role], *(os.path.join(self.dirs[role], n) for n in os.listdir(self.dirs[role]))):
                    os.chown(p, uid, uid)

    def command(self, role: str, cfg: str):
        """(argv, cwd, env) that start one side (candidate or runner); cfg is its JSON argument."""
        mode, folder = self.mode, self.dirs[role]
        uid = None if self.uids is None else self.uids[0 if role == "candidate" else 1]
        script = FILES[role][0]
        if mode.level == "bwrap":
            work = "/tmp/" + os.path.basename(folder)
            files = {n: os.path.join(folder, n) for n in os.listdir(folder)}
            cmd = _bwrap(mode.python, files, work, uid) + [mode.python, "-I", "-B", f"{work}/{script}"]
            cwd = "/"
        else:
            work = cwd = folder
            cmd = [mode.python, "-I", "-B", os.path.join(work, script)]
            if uid is not None:
                cmd = _setpriv(uid) + cmd
            if mode.netns:
                # a mount namespace only so that /proc can be the sample's own: the host's /proc would show
                # every other process's command line (and make a walk of it cost what the host holds)
                cmd = _UNSHARE + cmd
        if self.cgroup is not None:
            cmd = self.cgroup.enter() + cmd
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        return cmd + [cfg], cwd, env

    def over_memory(self) -> bool:
        return self.cgroup is not None and self.cgroup.oom_killed()

    def cleanup(self) -> None:
        """Kill whatever the sample left running, then remove everything it made."""
        if self.cgroup is not None:
            self.cgroup.kill()
        if self.uids is not None:
            _kill_uids(self.uids)
        for d in self.dirs.values():
            shutil.rmtree(d, ignore_errors=True)
        if self.uids is not None and self.mode.level == "namespaces":
            _remove_files_of(self.uids, world_writable_dirs())
        if self.cgroup is not None:
            self.cgroup.remove()


@contextlib.contextmanager
def sample(mode: SandboxMode, program: str, memory_mb: int):
    """A staged Sample for program at mode's level, cleaned up on exit."""
    memory = memory_level()
    with contextlib.ExitStack() as stack:
        box = Sample(mode, memory)
        if mode.drop_user:
            box.uids = stack.enter_context(_uid_pair())
        try:
            if memory.parent is not None:
                try:
                    box.cgroup = SampleCgroup(memory, memory_mb * 2**20)
                except OSError as e:  # the parent went away since the probe: RLIMIT_AS still holds
                    _say_once("memory-lost", f"score sandbox: no memory cgroup for a sample ({e}); "
                              "per-process limits only\n")
            box.stage(program)
            yield box
        finally:
            box.cleanup()
