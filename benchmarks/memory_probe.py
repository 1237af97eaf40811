"""Benchmark cases, and the peak extra memory of one variant of one case.

A case is built by a factory in a benchmarks/test_bench_*.py module (its `CASES` dict):
`CASES[op](machine) -> {"shape": str, "ours": fn, "baseline": fn, optional "rounds": int,
"iterations": int (calls per round)}`; the callables take no arguments (their inputs are built by
the factory, so inputs never count as extra).

On the CPU each variant is probed in a fresh process, because a process's allocator state (and the
other variant's high-water mark) would otherwise leak into the number:

    python -m benchmarks.memory_probe --module benchmarks.test_bench_token_kl --op token_kl --variant ours

prints one JSON line {"peak_extra_bytes": ...}. The probe runs the variant once to warm up, resets
the kernel's peak-RSS counter (/proc/self/clear_refs), and reads VmHWM - VmRSS around a second run.
glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_) so large tensors are mapped and unmapped
on every call instead of being recycled from the heap, which would hide them from the counter.
On a GPU, `cuda_peak_extra` uses torch.cuda.max_memory_allocated in the calling process.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import subprocess
import sys

import torch

# TEST-ONLY hook: "op:slow=N,alloc_mb=M" makes the harness call `ours` N times per round and hold an
# extra M MiB while it runs. tests/test_perf_gate.py uses it to prove the gate fails; it never
# touches the real op.
TEST_HOOK_ENV = "SCORE_BENCH_TEST_HOOK"
MMAP_THRESHOLD = 1 << 17
THREADS_ENV = "SCORE_BENCH_THREADS"


def device_for(machine: str) -> str:
    return "cuda" if machine == "gpu" else "cpu"


def _parse_hook(op: str) -> dict:
    spec = os.environ.get(TEST_HOOK_ENV, "")
    name, _, opts = spec.partition(":")
    if not spec or name != op:
        return {}
    out = {}
    for kv in filter(None, opts.split(",")):
        k, _, v = kv.partition("=")
        out[k.strip()] = float(v)
    return out


def apply_test_hook(op: str, case: dict, machine: str) -> dict:
    hook = _parse_hook(op)
    if not hook:
        return case
    ours, slow, alloc = case["ours"], int(hook.get("slow", 1)), int(hook.get("alloc_mb", 0) * 2**20)
    dev = device_for(machine)

    def hooked():
        ballast = torch.ones(alloc, dtype=torch.uint8, device=dev) if alloc else None
        for _ in range(slow):
            out = ours()
        del ballast
        return out

    return {**case, "ours": hooked, "hooked": hook}


def load_case(module: str, op: str, machine: str) -> dict:
    factory = importlib.import_module(module).CASES[op]
    return apply_test_hook(op, factory(machine), machine)


# ----------------------------------------------------------------------------- CPU: this process
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_extra(fn) -> int | None:
    """Peak RSS above the steady state during one call of fn, in bytes (None if unmeasurable)."""
    out = fn()  # warm-up: lazy imports, thread pools and op registration are not the variant's memory
    del out
    gc.collect()
    if not _reset_peak():
        return None
    base = _status_kb("VmRSS")
    out = fn()
    peak = _status_kb("VmHWM")
    del out
    return max(0, peak - base) * 1024


# ----------------------------------------------------------------------------- GPU: this process
def cuda_peak_extra(fn) -> int:
    out = fn()
    del out
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return max(0, peak - base)


# ----------------------------------------------------------------------------- driver
def probe_subprocesses(module: str, op: str, variants, machine: str = "cpu", timeout: float = 300) -> dict:
    """Runs the probe for each variant in its own fresh Python process, all at once; returns
    {variant: bytes or None}."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    procs = {}
    for v in variants:
        cmd = [sys.executable, "-m", "benchmarks.memory_probe", "--module", module, "--op", op,
               "--variant", v, "--machine", machine]
        procs[v] = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
    out = {}
    for v, p in procs.items():
        try:
            so, se = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            so, se = p.communicate()
            raise RuntimeError(f"memory probe {op}/{v} timed out after {timeout} s")
        if p.returncode != 0:
            raise RuntimeError(f"memory probe {op}/{v} failed:\n{se[-2000:]}")
        out[v] = json.loads(so.strip().splitlines()[-1])["peak_extra_bytes"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--module", required=True)
    p.add_argument("--op", required=True)
    p.add_argument("--variant", choices=("ours", "baseline"), required=True)
    p.add_argument("--machine", default="cpu", choices=("cpu", "gpu"))
    a = p.parse_args(argv)
    if os.environ.get(THREADS_ENV):
        torch.set_num_threads(int(os.environ[THREADS_ENV]))
    case = load_case(a.module, a.op, a.machine)
    fn = case[a.variant]
    peak = cuda_peak_extra(fn) if a.machine == "gpu" else cpu_peak_extra(fn)
    print(json.dumps({"op": a.op, "variant": a.variant, "machine": a.machine, "peak_extra_bytes": peak}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
