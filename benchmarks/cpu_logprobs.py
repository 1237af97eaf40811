"""CPU benchmark: linear_logprobs forward+backward vs the naive log_softmax(h @ W.T).gather, fp32.

    python benchmarks/cpu_logprobs.py [--N 4096 --d 576 --V 49152] [--reps 3] [--entropy]

Time: both variants in this process, interleaved round by round (so both see the same machine
load), median of `reps` rounds after a warm-up. Memory: each variant in a fresh subprocess; the
peak-RSS counter is reset (/proc/self/clear_refs) after inputs are built and a warm-up call, and
the extra peak is VmHWM - VmRSS around one more call. Gradients (dhidden, dweight) count as extra
memory on both sides. Prints both ratios and writes benchmarks/results/cpu_logprobs.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _inputs(N, d, V, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, d, generator=g) * 0.5).requires_grad_(True)
    w = (torch.randn(V, d, generator=g) * 0.05).requires_grad_(True)
    t = torch.randint(0, V, (N,), generator=g)
    up = torch.randn(N, generator=g)  # an arbitrary upstream gradient, not a mean
    return h, w, t, up


def _variant(name, entropy):
    import torch

    from score_kernels.linear_logprobs import linear_logprobs

    def naive(h, w, t, up):
        lsm = torch.log_softmax(h @ w.t(), dim=-1)
        lp = lsm.gather(-1, t[:, None]).squeeze(-1)
        loss = (lp * up).sum()
        if entropy:
            loss = loss + (-(lsm.exp() * lsm).sum(-1) * up).sum()
        return torch.autograd.grad(loss, (h, w))

    def ours(h, w, t, up):
        out = linear_logprobs(h, w, t, return_entropy=entropy, backend="torch")
        loss = ((out[0] + out[1]) * up).sum() if entropy else (out * up).sum()
        return torch.autograd.grad(loss, (h, w))

    return {"naive": naive, "ours": ours}[name]


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def probe_memory(name, N, d, V, entropy) -> int:
    """Runs in a fresh process: peak extra resident bytes of one forward+backward."""
    import gc
    fn = _variant(name, entropy)
    args = _inputs(N, d, V)
    fn(*args)  # warm-up: MKL buffers, thread pools, lazy inits
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status("VmRSS")
    out = fn(*args)
    peak = _status("VmHWM")
    del out
    return peak - base


def measure_memory(name, N, d, V, entropy) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 17))  # big tensors map/unmap: RSS sees them
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); from benchmarks.cpu_logprobs import probe_memory; "
            f"print(probe_memory({name!r}, {N}, {d}, {V}, {entropy}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def measure_time(N, d, V, entropy, reps):
    import torch
    args = _inputs(N, d, V)
    fns = {k: _variant(k, entropy) for k in ("naive", "ours")}
    times = {k: [] for k in fns}
    for k, fn in fns.items():
        fn(*args)
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn(*args)
            times[k].append(time.perf_counter() - t0)
    # correctness of what was timed
    gn, go = fns["naive"](*args), fns["ours"](*args)
    err = max((a - b).abs().max().item() / max(1e-30, a.abs().max().item()) for a, b in zip(gn, go))
    del torch
    return {k: statistics.median(v) for k, v in times.items()}, {k: v for k, v in times.items()}, err


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--N", type=int, default=4096)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--V", type=int, default=49152)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--entropy", action="store_true")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu_logprobs.json"))
    a = p.parse_args(argv)
    import torch

    from score_kernels import _vocab_tiles as budgets
    med, allt, err = measure_time(a.N, a.d, a.V, a.entropy, a.reps)
    mem = {k: measure_memory(k, a.N, a.d, a.V, a.entropy) for k in ("naive", "ours")}
    res = {
        "shape": {"N": a.N, "d": a.d, "V": a.V, "dtype": "float32", "entropy": a.entropy},
        "time_s": med, "time_rounds_s": allt, "extra_peak_bytes": mem,
        "time_ratio": med["ours"] / med["naive"], "memory_ratio": mem["ours"] / mem["naive"],
        "max_rel_grad_diff": err,
        "budgets_mb": {"work": budgets.WORK_BYTES / 2**20, "cache": budgets.CACHE_BYTES / 2**20},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(f"N={a.N} d={a.d} V={a.V} fp32 fwd+bwd{' +entropy' if a.entropy else ''}: "
          f"naive {med['naive']:.2f}s {mem['naive'] / 2**20:.0f}MiB | ours {med['ours']:.2f}s "
          f"{mem['ours'] / 2**20:.0f}MiB")
    print(f"time ratio {res['time_ratio']:.3f} (target <= 1), memory ratio {res['memory_ratio']:.3f} "
          f"(target <= 0.25), grad rel diff {err:.1e}")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
