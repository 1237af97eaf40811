"""GPU benchmarks: every op's time, TF/s or GB/s, and fraction of the measured peak.

    python benchmarks/gpu_bench.py [--quick] [--only NAME] [--out results.json]

Discovers benchmarks/gpu/bench_*.py; each exposes run(quick) -> list of rows (see gpu_timing.row).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.gpu_timing import calibrate  # noqa: E402


def _commit() -> str:
    if os.environ.get("SCORE_COMMIT"):  # the device copy of the tree has no .git
        return os.environ["SCORE_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def format_table(rows: list[dict]) -> str:
    lines = [f"{'op':<22} {'shape':<28} {'variant':<16} {'ms':>9} {'TF/s|GB/s':>10} {'%peak':>6} {'mem GB':>7}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['op']:<22} {r['shape']:<28} {r['variant']:<16} error: {r['error'][:60]}")
            continue
        rate = r.get("tflops", r.get("gbs"))
        rate_s = f"{rate:10.1f}" if rate is not None else f"{'-':>10}"
        frac = f"{100 * r['frac_peak']:6.1f}" if "frac_peak" in r else f"{'-':>6}"
        lines.append(f"{r['op']:<22} {r['shape']:<28} {r['variant']:<16} {r['ms']:9.3f} {rate_s} {frac} "
                     f"{r.get('extra_mem_gb', 0):7.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: GPU benchmarks not run")
        return 0
    peak = calibrate()
    print(f"device {peak['device']}: bf16 matmul {peak['matmul_bf16_tflops']:.0f} TF/s, copy {peak['copy_gbs']:.0f} GB/s")
    import benchmarks.gpu as pkg
    rows, failed = [], []
    for m in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if not m.name.startswith("bench_") or (args.only and args.only not in m.name):
            continue
        t0 = time.time()
        try:
            mod = importlib.import_module(f"benchmarks.gpu.{m.name}")
            rows += mod.run(quick=args.quick)
        except Exception:
            failed.append(m.name)
            traceback.print_exc()
        print(f"[{m.name}] {time.time() - t0:.1f}s", flush=True)
        torch.cuda.empty_cache()
    print(format_table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": peak["device"], "commit": _commit(), "torch": torch.__version__, "peak": peak,
                       "rows": rows, "failed": failed, "time": time.strftime("%Y-%m-%d %H:%M:%S")}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
