"""Running untrusted, model-written Python against its tests.

Layers of containment, each used where the machine allows it:
- a fresh temporary directory as cwd, HOME and TMPDIR, removed afterwards;
- an empty environment (PATH, HOME, TMPDIR, LANG only), `python -I`;
- resource limits set by the harness before the program runs: CPU time, address space, open files,
  processes, file size, no core dumps;
- a new network namespace (`unshare -n`, root only: nothing but a downed loopback) and a new PID
  namespace (`unshare -p -f --kill-child`), so killing the sandbox kills every process it forked;
  without them a blocked socket module and process-group kill;
- an unprivileged user (`setpriv` to nobody, 65534, root only) that cannot touch the caller's files;
- a wall-clock timeout that SIGKILLs the whole process group.

Success needs exit status 0 AND a per-run nonce that the harness prints only after the tests ran to
the end, so `sys.exit(0)`/`os._exit(0)` before the tests score as failed. (A program that inspects
the harness's own frames could still find the nonce; the containment does not depend on it.)
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

STATUSES = ("passed", "failed", "timeout", "error", "memory")
NOBODY = 65534
_HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_harness.py")
_OUTPUT_CAP = 64 * 1024


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
    netns: bool  # unshare -n -p -f available
    drop_user: bool  # setpriv to nobody available
    python: str


@functools.lru_cache(maxsize=1)
def sandbox_mode() -> SandboxMode:
    """Probe once per process which isolation this machine allows."""
    env = {"PATH": "/usr/bin:/bin"}

    def ok(cmd):
        try:
            return subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, timeout=10).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False

    forced = os.environ.get("SCORE_SANDBOX_MODE", "")  # "basic" turns the namespaces and setpriv off
    netns = forced != "basic" and shutil.which("unshare") is not None and ok(
        ["unshare", "-n", "-p", "-f", "--kill-child", "true"])
    drop_user, python = False, sys.executable
    if forced != "basic" and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("setpriv"):
        # The sandboxed user must be able to read its interpreter (a venv under /root is not).
        for cand in (os.environ.get("SCORE_SANDBOX_PYTHON"), "/usr/bin/python3", sys.executable):
            if cand and ok(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--",
                            cand, "-I", "-c", "import resource, json"]):
                drop_user, python = True, cand
                break
    return SandboxMode(netns=netns, drop_user=drop_user, python=python)


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


def check_program(program: str, tests: str, *, timeout_s: float = 5.0, memory_mb: int = 1024,
                  max_procs: int = 32) -> ExecResult:
    """Run program followed by tests in the sandbox. passed is True only when every test ran."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb must be >= 64, got {memory_mb}")
    mode = sandbox_mode()
    # nobody must be able to reach the directory: a caller's TMPDIR may sit under a private home.
    tmp = tempfile.mkdtemp(prefix="score_sbx_", dir="/tmp" if mode.drop_user and os.path.isdir("/tmp") else None)
    nonce = secrets.token_hex(16)
    t0 = time.monotonic()
    try:
        for name, text in (("solution.py", program), ("tests.py", tests)):
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        harness = os.path.join(tmp, "_harness.py")
        shutil.copyfile(_HARNESS, harness)
        if mode.drop_user:
            for p in (tmp, *(os.path.join(tmp, n) for n in os.listdir(tmp))):
                os.chown(p, NOBODY, NOBODY)
        cfg = {"block_network": not mode.netns, "limits": {
            "RLIMIT_CPU": int(math.ceil(timeout_s)) + 1,
            "RLIMIT_AS": memory_mb * 2**20,
            "RLIMIT_NOFILE": 64,
            "RLIMIT_NPROC": max_procs,
            "RLIMIT_FSIZE": 16 * 2**20,
            "RLIMIT_CORE": 0,
        }}
        cmd = [mode.python, "-I", "-B", harness, json.dumps(cfg)]
        if mode.drop_user:
            cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"] + cmd
        if mode.netns:
            cmd = ["unshare", "-n", "-p", "-f", "--kill-child"] + cmd
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        # Anonymous files, not pipes: no deadlock on big output, and nothing in tmp to symlink-swap.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True)
            try:
                proc.stdin.write((nonce + "\n").encode())
                proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            timed_out = not _wait_unreaped(proc.pid, timeout_s)
            # Kill the group while its leader is still a zombie, so its id cannot have been reused.
            _kill_group(proc)
            rc = proc.wait()
            stdout, stderr = _read(out), _read(err)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.monotonic() - t0
    ok_line = re.search(r"(?m)^" + nonce + r"$", stdout) is not None
    stdout = stdout.replace(nonce, "").rstrip("\n")
    if timed_out or rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        status = "timeout"
    elif rc == 0 and ok_line:
        status = "passed"
    elif rc == 3 or "MemoryError" in stderr[-2000:]:
        status = "memory"
    elif rc in (0, 1):
        status = "failed"
    else:
        status = "error"
    return ExecResult(passed=status == "passed", status=status, stdout=stdout, stderr=stderr,
                      returncode=rc, wall_s=wall)


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
