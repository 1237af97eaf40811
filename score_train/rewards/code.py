"""Running untrusted, model-written Python against its tests.

The verdict. The program and the tests run in two processes, each in its own sandbox: the candidate
(_harness.py) runs the program and serves calls; the trusted runner (_runner.py) runs the tests in an
interpreter the program never runs in, calling the program's functions over a pipe and receiving
plain data (no pickle, no objects with the program's methods). `passed` is read only from the
runner's exit status, so no program text can end the tests early, patch them, or print a verdict.
The argument, what it does not cover, and the containment below are in docs/tasks-rewards-eval.md
("Code sandbox: threat model").

Containment, strongest level available on the machine (`sandbox_mode()`; said once on stderr when it
is not bubblewrap):
- "bwrap": bubblewrap (unprivileged user, mount, PID, IPC, network, UTS namespaces; as root first a
  per-sample uid). Only /usr (and the interpreter) are visible, read-only; private size-capped tmpfs
  /tmp, /dev/shm and /var/tmp vanish with the sample; a private /proc; no network; no new user
  namespaces; killed with its parent.
- "namespaces": root without bubblewrap: `unshare -m -n -p -f --mount-proc --kill-child` (a private
  network, PID namespace and /proc) plus `setpriv` to a per-sample uid; files that uid leaves in /tmp, /dev/shm, /var/tmp are deleted afterwards.
- "basic": neither: the socket module is blocked, the environment emptied, limits set.
Every level: resource limits (CPU, address space, files, processes, file size), an empty
environment, `python -I`, a wall-clock timeout that SIGKILLs everything the sample started.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import math
import os
import re
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

STATUSES = ("passed", "failed", "timeout", "error", "memory")
ISOLATION_LEVELS = ("bwrap", "namespaces", "basic")  # strongest first
NOBODY = 65534
_HERE = os.path.dirname(os.path.abspath(__file__))
_FILES = {"candidate": ("_harness.py", "_wire.py"), "runner": ("_runner.py", "_wire.py")}
_OUTPUT_CAP = 64 * 1024
_TMPFS_BYTES = 64 * 2**20
# Per-sample uids (root only): two per slot, far above any real account. A distinct uid per sample
# keeps RLIMIT_NPROC, signals and file access of concurrent samples apart.
_UID_BASE = 1_000_000
_UID_SLOTS = 4096


@dataclass
class ExecResult:
    passed: bool
    status: str  # one of STATUSES
    stdout: str = ""
    stderr: str = ""
    returncode: int | None = None
    wall_s: float = 0.0


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
    cmd += ["--chdir", workdir, "--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(NOBODY),
            "--gid", str(NOBODY), "--die-with-parent", "--new-session", "--clearenv",
            "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", workdir, "--setenv", "TMPDIR", workdir,
            "--setenv", "LANG", "C.UTF-8", "--"]
    return cmd


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
        if not (shutil.which("unshare") and shutil.which("setpriv")
                and _ok(["unshare", "-m", "-n", "-p", "-f", "--mount-proc", "--kill-child", "true"])):
            return None, "unshare -m -n -p --mount-proc failed"
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


def _announce(mode: SandboxMode) -> None:
    """Say once per process, on stderr, when the sandbox runs below bubblewrap."""
    if mode.level == "bwrap":
        return
    with _announce_lock:
        if mode.level in _announced:
            return
        _announced.add(mode.level)
    sys.stderr.write(f"score sandbox: running model-written code at isolation level {mode.level!r}, not "
                     f"'bwrap' ({mode.why or 'forced by the caller'}); see docs/tasks-rewards-eval.md. "
                     "`apt-get install bubblewrap` (scripts/setup.sh does it as root) gives the strongest.\n")
    sys.stderr.flush()


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


def _remove_files_of(uids: tuple[int, ...]) -> None:
    """namespaces level: what the sample's uids left in the shared temporary directories."""
    for top in ("/tmp", "/dev/shm", "/var/tmp"):
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


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
    """Wait for pid to exit without reaping it (WNOWAIT); False on timeout."""
    deadline = time.monotonic() + timeout_s
    pause = 0.001
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.02)


def _read(f) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - _OUTPUT_CAP))
    return f.read().decode("utf-8", errors="replace")


def _signal_of(rc: int | None) -> int | None:
    """The signal that ended a process: -sig from Popen, 128+sig through unshare / bwrap."""
    if rc is None:
        return None
    if rc < 0:
        return -rc
    if 128 < rc < 128 + 65:
        return rc - 128
    return None


def _status(timed_out: bool, runner_rc: int, cand_rc: int | None, stderr: str) -> str:
    """The verdict from the trusted runner's exit status (see _runner.py); the candidate's own exit
    status only explains a failure, it never makes one pass."""
    if timed_out or _signal_of(runner_rc) == signal.SIGXCPU:
        return "timeout"
    if runner_rc == 0:
        return "passed"
    if runner_rc == 1:
        return "failed"
    if runner_rc == 3:
        return "memory"
    if runner_rc == 4:  # the candidate died or broke the protocol
        if _signal_of(cand_rc) == signal.SIGXCPU:
            return "timeout"
        if "MemoryError" in stderr[-2000:]:
            return "memory"
        return "failed" if cand_rc in (0, 1) else "error"
    return "error"


def _command(mode: SandboxMode, role: str, folder: str, uid: int | None, cfg: dict):
    """(argv, cwd, env) that start one side (candidate or runner) at the sandbox level of mode."""
    script = _FILES[role][0]
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
            cmd = ["unshare", "-m", "-n", "-p", "-f", "--mount-proc", "--kill-child"] + cmd
    cmd.append(json.dumps(cfg))
    return cmd, cwd, {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}


def _stage_dirs(dirs: dict, program: str, base: str | None, uids) -> None:
    """One private directory per role, filled with its files (and solution.py for the candidate), owned by the
    role's uid when users are dropped. Fills dirs as it goes, so the caller's cleanup sees every one made."""
    for role in ("candidate", "runner"):
        # nobody must be able to reach the directory: a caller's TMPDIR may sit under a private home.
        d = dirs[role] = tempfile.mkdtemp(prefix="score_sbx_", dir=base)
        for name in _FILES[role]:
            shutil.copyfile(os.path.join(_HERE, name), os.path.join(d, name))
    with open(os.path.join(dirs["candidate"], "solution.py"), "w", encoding="utf-8") as f:
        f.write(program)
    if uids is not None:
        for role, uid in zip(("candidate", "runner"), uids):
            for p in (dirs[role], *(os.path.join(dirs[role], n) for n in os.listdir(dirs[role]))):
                os.chown(p, uid, uid)


def check_program(program: str, tests: str, *, timeout_s: float = 5.0, memory_mb: int = 1024,
                  max_procs: int = 32, isolation: str | None = None) -> ExecResult:
    """Run program, then tests against it, in the sandbox. passed is True only when every test ran.

    isolation: None (the strongest level the machine allows) or one of ISOLATION_LEVELS."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb must be >= 64, got {memory_mb}")
    mode = sandbox_mode(isolation)
    _announce(mode)
    t0 = time.monotonic()
    limits = {"RLIMIT_CPU": int(math.ceil(timeout_s)) + 1, "RLIMIT_AS": memory_mb * 2**20, "RLIMIT_NOFILE": 64,
              "RLIMIT_NPROC": max_procs, "RLIMIT_FSIZE": 16 * 2**20, "RLIMIT_CORE": 0}
    with contextlib.ExitStack() as stack:
        uids = stack.enter_context(_uid_pair()) if mode.drop_user else None
        base = "/tmp" if mode.drop_user and os.path.isdir("/tmp") else None
        dirs, procs, outs, fds = {}, {}, {}, []
        try:
            _stage_dirs(dirs, program, base, uids)
            req_r, req_w = os.pipe()  # runner -> candidate
            resp_r, resp_w = os.pipe()  # candidate -> runner
            fds += [req_r, req_w, resp_r, resp_w]
            ends = {"candidate": (req_r, resp_w), "runner": (resp_r, req_w)}
            tests_in = stack.enter_context(tempfile.TemporaryFile())
            tests_in.write(tests.encode("utf-8"))
            tests_in.seek(0)
            for i, role in enumerate(("candidate", "runner")):
                rfd, wfd = ends[role]
                cfg = {"block_network": not mode.netns, "limits": limits, "rfd": rfd, "wfd": wfd}
                cmd, cwd, env = _command(mode, role, dirs[role], None if uids is None else uids[i], cfg)
                # Anonymous files, not pipes: no deadlock on big output, and nothing in tmp to symlink-swap.
                out = stack.enter_context(tempfile.TemporaryFile())
                err = stack.enter_context(tempfile.TemporaryFile())
                outs[role] = (out, err)
                stdin = tests_in if role == "runner" else subprocess.DEVNULL
                procs[role] = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=stdin, stdout=out, stderr=err,
                                               start_new_session=True, close_fds=True, pass_fds=(rfd, wfd))
            for fd in fds:
                os.close(fd)
            fds = []
            runner, cand = procs["runner"], procs["candidate"]
            timed_out = not _wait_unreaped(runner.pid, timeout_s)
            # The candidate gets EOF once the runner is gone; a moment to exit on its own tells why it ended.
            cand_done = _wait_unreaped(cand.pid, 0.0 if timed_out else 0.2)
            # Kill each group while its leader is still a zombie, so its id cannot have been reused.
            for p in (runner, cand):
                _kill_group(p)
            runner_rc = runner.wait()
            cand_rc = cand.wait()
            if not cand_done:
                cand_rc = None  # killed by us: says nothing about how the program ended
        finally:
            for fd in fds:
                os.close(fd)
            for p in procs.values():
                if p.poll() is None:
                    _kill_group(p)
                    p.wait()
            if uids is not None:
                _kill_uids(uids)
            for d in dirs.values():
                shutil.rmtree(d, ignore_errors=True)
            if uids is not None and mode.level == "namespaces":
                _remove_files_of(uids)
        stdout = "\n".join(s for s in (_read(outs["candidate"][0]).rstrip("\n"),
                                       _read(outs["runner"][0]).rstrip("\n")) if s)
        stderr = _read(outs["candidate"][1]) + _read(outs["runner"][1])
    status = _status(timed_out, runner_rc, cand_rc, stderr)
    return ExecResult(passed=status == "passed", status=status, stdout=stdout, stderr=stderr,
                      returncode=runner_rc, wall_s=time.monotonic() - t0)


_FENCE = re.compile(r"```[ \t]*(?:python|py|Python|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str | None) -> str:
    """The last fenced code block of a response (an unclosed final fence counts), else the whole text."""
    if not text:
        return ""
    blocks = [b for b in _FENCE.findall(text) if b.strip()]
    return blocks[-1] if blocks else text


def build_program(code: str, prompt: str | None, entry_point: str | None) -> str:
    """A full program from the model's code. If it defines entry_point, it follows the whole prompt
    (which keeps the prompt's imports and helper functions; the prompt's docstring-only stub is
    redefined), or only the prompt's imports when the prompt is not valid Python on its own.
    Otherwise the code is taken as a completion of the prompt."""
    if not prompt:
        return code
    if entry_point and re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        try:
            compile(prompt, "prompt", "exec")
            return prompt.rstrip("\n") + "\n\n\n" + code
        except SyntaxError:
            imports = [ln for ln in prompt.splitlines() if re.match(r"\s*(from\s+\S+\s+)?import\s", ln)]
            return "\n".join(imports) + "\n\n" + code
    return prompt + code


def code_reward(text: str | None, tests: str, *, prompt: str | None = None, entry_point: str | None = None,
                timeout_s: float = 5.0, memory_mb: int = 1024) -> float:
    program = build_program(extract_code(text), prompt, entry_point)
    return 1.0 if check_program(program, tests, timeout_s=timeout_s, memory_mb=memory_mb).passed else 0.0
