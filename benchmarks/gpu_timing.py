"""The one timing helper every GPU benchmark uses.

- `calibrate()` measures this card's peaks: a large bf16 matmul (TF/s) and a device-to-device
  copy (GB/s, bytes read + written), so results are reported as a fraction of *measured* peak.
- `bench(fn, make_inputs)` times `fn(*inputs)` with CUDA events, median over repeats, rotating
  through several input sets so that nothing is timed out of L2 from the previous call, and reads
  the peak extra memory of the calls (torch.cuda.max_memory_allocated over what the inputs hold).
- `configure(device=..., smoke=..., budget_s=...)`: the smoke mode runs every benchmark on the CPU
  at tiny shapes (wall-clock timing, memory not measured) so that the scripts are tested where
  there is no GPU; its numbers mean nothing. `time_left()` is the benchmark's remaining budget.
"""
from __future__ import annotations

import statistics
import time

import torch

_PEAK: dict | None = None
_CFG = {"device": "cuda", "smoke": False, "deadline": None}


def configure(*, device: str | None = None, smoke: bool | None = None, budget_s: float | None = None,
              peak: dict | None = None) -> None:
    """device: "cuda" or "cpu"; smoke: tiny shapes; budget_s: seconds from now this benchmark may use;
    peak: a calibration measured earlier in the same run (gpu_bench.py --peak), reused as is."""
    global _PEAK
    if device is not None:
        _CFG["device"] = device
    if smoke is not None:
        _CFG["smoke"] = smoke
    if budget_s is not None:
        _CFG["deadline"] = time.monotonic() + budget_s
    if peak is not None:
        _PEAK = dict(peak)


def device() -> torch.device:
    return torch.device(_CFG["device"])


def on_gpu() -> bool:
    return _CFG["device"] == "cuda"


def smoke() -> bool:
    return bool(_CFG["smoke"])


def time_left() -> float:
    """Seconds left of this benchmark's budget (inf without one)."""
    d = _CFG["deadline"]
    return float("inf") if d is None else d - time.monotonic()


def sync() -> None:
    if on_gpu():
        torch.cuda.synchronize()


def empty_cache() -> None:
    if on_gpu():
        torch.cuda.empty_cache()


def _events_time(fn, args_list, warmup: int, rep: int) -> list[float]:
    for i in range(warmup):
        fn(*args_list[i % len(args_list)])
    sync()
    times = []
    for i in range(rep):
        args = args_list[i % len(args_list)]
        if on_gpu():
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn(*args)
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) * 1e-3)
        else:
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)
    return times


def calibrate(n: int = 8192, copy_bytes: int = 1 << 31) -> dict:
    """Measured bf16 matmul TF/s and copy GB/s on the current device (cached)."""
    global _PEAK
    if _PEAK is not None:
        return _PEAK
    dev = device()
    if not on_gpu():  # smoke mode: plumbing only
        n, copy_bytes = 256, 1 << 23
    mats = [(torch.randn(n, n, device=dev, dtype=torch.bfloat16),
             torch.randn(n, n, device=dev, dtype=torch.bfloat16)) for _ in range(2)]
    t = statistics.median(_events_time(torch.matmul, mats, 3, 10))
    tflops = 2 * n**3 / t / 1e12
    del mats
    src = [torch.empty(copy_bytes // 2, dtype=torch.uint8, device=dev) for _ in range(2)]
    dst = torch.empty(copy_bytes // 2, dtype=torch.uint8, device=dev)
    t = statistics.median(_events_time(lambda a, dst=dst: dst.copy_(a), [(x,) for x in src], 3, 10))
    gbs = 2 * (copy_bytes // 2) / t / 1e9
    del src, dst
    empty_cache()
    name = torch.cuda.get_device_name() if on_gpu() else "cpu (smoke)"
    _PEAK = {"matmul_bf16_tflops": tflops, "copy_gbs": gbs, "device": name,
             "matmul_n": n, "copy_bytes": copy_bytes}
    return _PEAK


def bench(fn, make_inputs, *, n_inputs: int = 3, warmup: int = 3, rep: int = 10) -> dict:
    """Median seconds of fn(*make_inputs()) over `rep` runs, rotating `n_inputs` input sets, and the
    peak memory the calls allocate beyond the inputs (GPU only; None on the CPU)."""
    if smoke():  # the Triton interpreter takes seconds a call: one untimed-warm-up-free call
        n_inputs, warmup, rep = 1, 0, 1
    args_list = [tuple(make_inputs()) for _ in range(n_inputs)]
    base = None
    if on_gpu():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = _events_time(fn, args_list, warmup, rep)
    extra = torch.cuda.max_memory_allocated() - base if base is not None else None
    return {"median_s": statistics.median(times), "min_s": min(times),
            "extra_mem_bytes": int(extra) if extra is not None else None}


def row(op: str, shape: str, variant: str, res: dict, *, flops: float | None = None,
        bytes_moved: float | None = None) -> dict:
    """A result row with useful TF/s or GB/s and the fraction of the measured peak."""
    peak = calibrate()
    mem = res.get("extra_mem_bytes")
    out = {"op": op, "shape": shape, "variant": variant, "ms": res["median_s"] * 1e3,
           "extra_mem_gb": mem / 1e9 if mem is not None else None}
    if flops is not None:
        out["tflops"] = flops / res["median_s"] / 1e12
        out["frac_peak"] = out["tflops"] / peak["matmul_bf16_tflops"]
    if bytes_moved is not None:
        out["gbs"] = bytes_moved / res["median_s"] / 1e9
        out["frac_peak"] = out["gbs"] / peak["copy_gbs"]
    return out


def error_row(op: str, shape: str, variant: str, e: BaseException | str) -> dict:
    """A variant that failed (or was skipped): reported in the table, never fatal to the run."""
    msg = e if isinstance(e, str) else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if isinstance(e, torch.OutOfMemoryError):
        msg = "OOM: " + str(e)[:120]
    empty_cache()
    return {"op": op, "shape": shape, "variant": variant, "error": msg[:200]}
