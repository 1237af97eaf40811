"""Running untrusted, model-written Python against its tests: the verdict.

The program and the tests run in two processes, each in its own sandbox: the candidate (_harness.py)
runs the program and serves calls; the trusted runner (_runner.py) runs the tests in an interpreter
the program never runs in, calling the program's functions over a pipe and receiving plain data (no
pickle, no objects with the program's methods). `passed` is read only from the runner's exit status,
so no program text can end the tests early, patch them, or print a verdict; a sample whose processes
went over its memory cgroup's limit is "memory" whatever the runner says. The containment (isolation
levels, uids, cgroups, limits) is in sandbox.py. The argument, what it does not cover, and the
threat model per level are in docs/tasks-rewards-eval.md ("Code: the sandbox").
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass

from score_train.rewards import sandbox
from score_train.rewards.sandbox import ISOLATION_LEVELS, SandboxMode, sandbox_mode  # noqa: F401 (public here too)

STATUSES = ("passed", "failed", "timeout", "error", "memory")
_OUTPUT_CAP = 64 * 1024


@dataclass
class ExecResult:
    passed: bool
    status: str  # one of STATUSES
    stdout: str = ""
    stderr: str = ""
    returncode: int | None = None
    wall_s: float = 0.0


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


def _wait_unreaped(pid: int, timeout_s: float, stop=lambda: False) -> bool:
    """Wait for pid to exit without reaping it (WNOWAIT); False on timeout or once stop() is true."""
    deadline = time.monotonic() + timeout_s
    pause = 0.001
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        left = deadline - time.monotonic()
        if pause >= 0.02 and stop():
            return False
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


def check_program(program: str, tests: str, *, timeout_s: float = 5.0, memory_mb: int = 1024,
                  max_procs: int = 32, isolation: str | None = None) -> ExecResult:
    """Run program, then tests against it, in the sandbox. passed is True only when every test ran.

    memory_mb: the sample's memory (both processes, every page: a cgroup where one can be made) and
    each process's address space. isolation: None (the strongest level the machine allows) or one of
    ISOLATION_LEVELS."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb must be >= 64, got {memory_mb}")
    mode = sandbox_mode(isolation)
    sandbox.announce(mode)
    t0 = time.monotonic()
    limits = {"RLIMIT_CPU": int(math.ceil(timeout_s)) + 1, "RLIMIT_AS": memory_mb * 2**20, "RLIMIT_NOFILE": 64,
              "RLIMIT_NPROC": max_procs, "RLIMIT_FSIZE": 16 * 2**20, "RLIMIT_CORE": 0}
    with contextlib.ExitStack() as stack:
        box = stack.enter_context(sandbox.sample(mode, program, memory_mb))
        procs, outs, fds = {}, {}, []
        try:
            req_r, req_w = os.pipe()  # runner -> candidate
            resp_r, resp_w = os.pipe()  # candidate -> runner
            fds += [req_r, req_w, resp_r, resp_w]
            ends = {"candidate": (req_r, resp_w), "runner": (resp_r, req_w)}
            tests_in = stack.enter_context(tempfile.TemporaryFile())
            tests_in.write(tests.encode("utf-8"))
            tests_in.seek(0)
            for role in ("candidate", "runner"):
                rfd, wfd = ends[role]
                cfg = {"block_network": not mode.netns, "limits": limits, "rfd": rfd, "wfd": wfd}
                cmd, cwd, env = box.command(role, json.dumps(cfg))
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
            # an OOM kill anywhere in the sample ends it at once: its verdict is "memory" whatever runs on
            ended = _wait_unreaped(runner.pid, timeout_s, box.over_memory)
            over_memory = box.over_memory()
            timed_out = not ended and not over_memory
            # The candidate gets EOF once the runner is gone; a moment to exit on its own tells why it ended.
            cand_done = _wait_unreaped(cand.pid, 0.2 if ended and not over_memory else 0.0)
            # Kill each group while its leader is still a zombie, so its id cannot have been reused.
            for p in (runner, cand):
                _kill_group(p)
            runner_rc = runner.wait()
            cand_rc = cand.wait()
            if not cand_done:
                cand_rc = None  # killed by us: says nothing about how the program ended
            over_memory = over_memory or box.over_memory()
        finally:
            for fd in fds:
                os.close(fd)
            for p in procs.values():
                if p.poll() is None:
                    _kill_group(p)
                    p.wait()
        stdout = "\n".join(s for s in (_read(outs["candidate"][0]).rstrip("\n"),
                                       _read(outs["runner"][0]).rstrip("\n")) if s)
        stderr = _read(outs["candidate"][1]) + _read(outs["runner"][1])
    status = "memory" if over_memory else _status(timed_out, runner_rc, cand_rc, stderr)
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
