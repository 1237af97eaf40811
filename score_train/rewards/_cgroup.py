"""A memory cgroup per sample: every process of the sample and every page it holds (anonymous memory,
memfd, SysV and POSIX shared memory, tmpfs files) count against one limit.

`memory_level()` finds, once per process, where per-sample cgroups can be made: cgroup v2 where its
memory controller is mounted and delegated to a cgroup we may write (ours or the nearest ancestor whose
`cgroup.subtree_control` has `memory`), else cgroup v1's memory hierarchy below our own cgroup, else
none ("rlimit": only the per-process RLIMIT_AS holds).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import os
import secrets
import signal
import time
from dataclasses import dataclass

LEVELS = ("cgroup2", "cgroup1", "rlimit")  # strongest first
_counter = itertools.count()


@dataclass(frozen=True)
class MemoryLevel:
    level: str  # one of LEVELS
    parent: str | None  # the directory per-sample cgroups are made in
    why: str = ""  # why a stronger level is not available


def _mounts():
    """[(fstype, mount point, options)] of the cgroup file systems."""
    out = []
    with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
                out.append((parts[2], parts[1].replace("\\040", " "), set(parts[3].split(","))))
    return out


def _own_paths():
    """{"2": path in the v2 hierarchy, "memory": path in v1's memory hierarchy} of this process."""
    out = {}
    with contextlib.suppress(OSError), open("/proc/self/cgroup") as f:
        for line in f:
            hier, ctrls, path = line.rstrip("\n").split(":", 2)
            if hier == "0" and ctrls == "":
                out["2"] = path
            elif "memory" in ctrls.split(","):
                out["memory"] = path
    return out


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _v2_parent(mount: str, own: str) -> str | None:
    """The nearest cgroup at or above ours that hands the memory controller to its children and that
    we may make children in. We never enable a controller ourselves: that would change the host's tree."""
    d = os.path.normpath(mount + "/" + own)
    while d.startswith(mount):
        with contextlib.suppress(OSError):
            if "memory" in _read(d + "/cgroup.subtree_control").split() and os.access(d, os.W_OK):
                return d
        if d == mount:
            break
        d = os.path.dirname(d)
    return None


def _works(level: str, parent: str) -> str:
    """'' when a limited child cgroup can be made in parent, else why not."""
    try:
        cg = SampleCgroup(MemoryLevel(level, parent), 64 * 2**20)
    except OSError as e:
        return f"cannot make a memory cgroup in {parent} ({e.strerror})"
    cg.remove()
    return ""


@functools.lru_cache(maxsize=None)
def memory_level() -> MemoryLevel:
    """Where this process can make per-sample memory cgroups (probed once per process)."""
    mounts, own, why = _mounts(), _own_paths(), []
    v2 = [m for t, m, _ in mounts if t == "cgroup2"]
    if not v2:
        why.append("cgroup2: not mounted")
    for m in v2:
        try:
            ok = "memory" in _read(m + "/cgroup.controllers").split()
        except OSError:
            ok = False
        parent = _v2_parent(m, own["2"]) if ok and "2" in own else None
        if parent is None:
            why.append(f"cgroup2 at {m}: " + ("no memory controller delegated to a cgroup we may write"
                                               if ok else "the memory controller is not in this hierarchy"))
            continue
        reason = _works("cgroup2", parent)
        if not reason:
            return MemoryLevel("cgroup2", parent, "; ".join(why))
        why.append("cgroup2: " + reason)
    v1 = [m for t, m, opts in mounts if t == "cgroup" and "memory" in opts]
    if not v1 or "memory" not in own:
        why.append("cgroup1: no memory hierarchy mounted")
    for m in v1[:1] if "memory" in own else []:
        parent = os.path.normpath(m + "/" + own["memory"])
        reason = _works("cgroup1", parent) if os.path.isdir(parent) else f"{parent} is not visible here"
        if not reason:
            return MemoryLevel("cgroup1", parent, "; ".join(why))
        why.append("cgroup1: " + reason)
    return MemoryLevel("rlimit", None, "; ".join(why))


class SampleCgroup:
    """One sample's memory cgroup, limited to limit_bytes (swap included, so nothing leaves to swap)."""

    def __init__(self, mode: MemoryLevel, limit_bytes: int):
        self.v2 = mode.level == "cgroup2"
        self.path = os.path.join(mode.parent, f"score_sbx_{os.getpid()}_{next(_counter)}_{secrets.token_hex(3)}")
        os.mkdir(self.path, 0o700)
        try:
            if self.v2:
                _write(self.path + "/memory.max", str(limit_bytes))
                for name, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                    with contextlib.suppress(OSError):  # absent without swap accounting / before 4.19
                        _write(f"{self.path}/{name}", value)
            else:
                _write(self.path + "/memory.limit_in_bytes", str(limit_bytes))
                with contextlib.suppress(OSError):  # absent without swap accounting
                    _write(self.path + "/memory.memsw.limit_in_bytes", str(limit_bytes))
        except OSError:
            self.remove()
            raise

    def enter(self) -> list[str]:
        """An argv prefix that moves the command into this cgroup before it runs (as the caller's user,
        so before any uid drop): `sh` writes its own pid, then execs the command."""
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', self.path + "/cgroup.procs"]

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of the sample for going over the limit."""
        name = "memory.events" if self.v2 else "memory.oom_control"
        try:
            for line in _read(f"{self.path}/{name}").splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
        except (OSError, ValueError):
            pass
        return False

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in _read(self.path + "/cgroup.procs").split()]
        except (OSError, ValueError):
            return []

    def kill(self, timeout_s: float = 2.0) -> None:
        """SIGKILL every process in the cgroup until none is left (setsid and uid changes do not
        leave a cgroup)."""
        if self.v2:
            with contextlib.suppress(OSError):
                _write(self.path + "/cgroup.kill", "1")  # 5.14+
        deadline = time.monotonic() + timeout_s
        while True:
            pids = self.pids()
            if not pids or time.monotonic() > deadline:
                return
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.002)

    def remove(self, timeout_s: float = 2.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.005)  # a killed process leaves its cgroup a moment after it exits
