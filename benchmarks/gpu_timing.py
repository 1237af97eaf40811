"""The one GPU timing helper every GPU benchmark uses.

- `calibrate()` measures this card's peaks: a large bf16 matmul (TF/s) and a device-to-device
  copy (GB/s, bytes read + written), so results are reported as a fraction of *measured* peak.
- `bench(fn, make_inputs)` times `fn(*inputs)` with CUDA events, median over repeats, rotating
  through several input sets so that nothing is timed out of L2 from the previous call.
"""
from __future__ import annotations

import statistics

import torch

_PEAK: dict | None = None


def _events_time(fn, args_list, warmup: int, rep: int) -> list[float]:
    for i in range(warmup):
        fn(*args_list[i % len(args_list)])
    torch.cuda.synchronize()
    times = []
    for i in range(rep):
        args = args_list[i % len(args_list)]
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(*args)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e-3)
    return times


def calibrate(n: int = 8192, copy_bytes: int = 1 << 31) -> dict:
    """Measured bf16 matmul TF/s and copy GB/s on the current device (cached)."""
    global _PEAK
    if _PEAK is not None:
        return _PEAK
    mats = [(torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
             torch.randn(n, n, device="cuda", dtype=torch.bfloat16)) for _ in range(2)]
    t = statistics.median(_events_time(torch.matmul, mats, 3, 10))
    tflops = 2 * n**3 / t / 1e12
    del mats
    src = [torch.empty(copy_bytes // 2, dtype=torch.uint8, device="cuda") for _ in range(2)]
    dst = torch.empty(copy_bytes // 2, dtype=torch.uint8, device="cuda")
    t = statistics.median(_events_time(lambda a: dst.copy_(a), [(x,) for x in src], 3, 10))
    gbs = 2 * (copy_bytes // 2) / t / 1e9
    del src, dst
    torch.cuda.empty_cache()
    _PEAK = {"matmul_bf16_tflops": tflops, "copy_gbs": gbs, "device": torch.cuda.get_device_name()}
    return _PEAK


def bench(fn, make_inputs, *, n_inputs: int = 3, warmup: int = 3, rep: int = 10) -> dict:
    """Median seconds of fn(*make_inputs()) over `rep` runs, rotating `n_inputs` input sets."""
    args_list = [tuple(make_inputs()) for _ in range(n_inputs)]
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = _events_time(fn, args_list, warmup, rep)
    extra = torch.cuda.max_memory_allocated() - base
    return {"median_s": statistics.median(times), "min_s": min(times), "extra_mem_bytes": int(extra)}


def row(op: str, shape: str, variant: str, res: dict, *, flops: float | None = None,
        bytes_moved: float | None = None) -> dict:
    """A result row with useful TF/s or GB/s and the fraction of the measured peak."""
    peak = calibrate()
    out = {"op": op, "shape": shape, "variant": variant, "ms": res["median_s"] * 1e3,
           "extra_mem_gb": res.get("extra_mem_bytes", 0) / 1e9}
    if flops is not None:
        out["tflops"] = flops / res["median_s"] / 1e12
        out["frac_peak"] = out["tflops"] / peak["matmul_bf16_tflops"]
    if bytes_moved is not None:
        out["gbs"] = bytes_moved / res["median_s"] / 1e9
        out["frac_peak"] = out["gbs"] / peak["copy_gbs"]
    return out
