"""GPU benchmarks: every op's time, TF/s or GB/s, and fraction of the measured peak, beside its peers.

    python benchmarks/gpu_bench.py [--quick] [--only NAME[,NAME]] [--out results.json] [--budget S]
    python benchmarks/gpu_bench.py --calibrate --out peak.json        # peaks only (one per run)
    python benchmarks/gpu_bench.py --only engine --peak peak.json --partial engine.jsonl --out engine.json
    python benchmarks/gpu_bench.py --merge a.json b.jsonl ... --out all.json --table table.txt
    python benchmarks/gpu_bench.py --smoke ...                         # CPU, tiny shapes, TRITON_INTERPRET=1

Discovers benchmarks/gpu/bench_*.py; each exposes run(quick=False) returning or yielding rows (see
gpu_timing.row). Rows are appended to --partial as they come, so a benchmark killed at its time
limit (scripts/device_check.sh runs each under `timeout`) still reports what it measured.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PEERS = ("torch", "triton", "transformers", "liger_kernel", "cut_cross_entropy", "flash_attn")


def _commit() -> str:
    if os.environ.get("SCORE_COMMIT"):  # the device copy of the tree may have no .git
        return os.environ["SCORE_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, cwd=ROOT,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def versions() -> dict:
    from importlib import metadata
    out = {}
    for name in PEERS:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _num(x, fmt: str, width: int) -> str:
    return f"{x:{width}{fmt}}" if isinstance(x, (int, float)) else f"{'-':>{width}}"


def format_table(rows: list[dict]) -> str:
    """One line per row: time, useful rate (TF/s or GB/s or tokens/s), % of the calibrated peak,
    peak extra memory, and the op-specific note (speed-up, error vs naive, phase split...)."""
    lines = [(f"{'op':<22} {'shape':<30} {'variant':<28} {'ms':>10} {'TF/s|GB/s':>10} {'%peak':>6} "
              f"{'mem GB':>7}  note")]
    for r in rows:
        head = f"{r.get('op', '?'):<22} {r.get('shape', '')!s:<30} {r.get('variant', '')!s:<28}"
        if "error" in r:
            lines.append(f"{head} {'error:':>10} {r['error'][:90]}")
            continue
        rate = r.get("tflops", r.get("gbs"))
        frac = 100 * r["frac_peak"] if isinstance(r.get("frac_peak"), (int, float)) else None
        lines.append(f"{head} {_num(r.get('ms'), '.3f', 10)} {_num(rate, '.1f', 10)} {_num(frac, '.1f', 6)} "
                     f"{_num(r.get('extra_mem_gb'), '.2f', 7)}  {r.get('note', '')}".rstrip())
    return "\n".join(lines)


def _modules(only: str | None) -> list[str]:
    import benchmarks.gpu as pkg
    names = sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules(pkg.__path__) if m.name.startswith("bench_"))
    if not only:
        return names
    want = [w.strip() for w in only.split(",") if w.strip()]
    unknown = [w for w in want if w not in names]
    if unknown:
        raise SystemExit(f"--only: no benchmark {unknown}; have {names}")
    return want


def _write(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def _read_results(path: str) -> dict:
    """A --out JSON, or a --partial JSON-lines file (rows of a benchmark that did not finish)."""
    if path.endswith(".jsonl"):
        rows = []
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:  # the line being written when the process was killed
                        pass
        return {"rows": rows, "partial": True}
    with open(path) as f:
        return json.load(f)


def merge(paths: list[str]) -> dict:
    """One result from several: a benchmark's finished JSON wins over its partial rows."""
    done = {}
    for p in paths:
        if not p.endswith(".jsonl") and os.path.exists(p):
            done[os.path.splitext(os.path.basename(p))[0]] = _read_results(p)
    out = {"rows": [], "failed": [], "benchmarks": {}}
    for p in paths:
        if not os.path.exists(p):
            continue
        stem = os.path.splitext(os.path.basename(p))[0]
        if p.endswith(".jsonl") and stem in done:
            continue
        d = _read_results(p)
        for k in ("device", "commit", "torch", "peak", "versions", "smoke"):
            if k in d and k not in out:
                out[k] = d[k]
        out["rows"] += d.get("rows", [])
        out["failed"] += d.get("failed", [])
        out["benchmarks"].update(d.get("benchmarks", {}))
        if d.get("partial"):
            out["failed"].append(stem)
            out["benchmarks"][stem] = {"status": "killed at its time limit (partial rows)",
                                       "rows": len(d["rows"])}
    out["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: tests the scripts, measures nothing")
    p.add_argument("--only", default=None, help="comma-separated benchmark names (bench_NAME.py)")
    p.add_argument("--out", default=None, help="JSON result file")
    p.add_argument("--partial", default=None, help="JSON-lines file the rows are appended to as they come")
    p.add_argument("--budget", type=float, default=None, help="seconds each benchmark may use (soft)")
    p.add_argument("--peak", default=None, help="reuse the calibration in this JSON (from --calibrate)")
    p.add_argument("--calibrate", action="store_true", help="measure the peaks only")
    p.add_argument("--merge", nargs="+", default=None, help="merge result files (.json / .jsonl)")
    p.add_argument("--table", default=None, help="also write the table to this file")
    args = p.parse_args(argv)

    if args.merge:
        res = merge(args.merge)
        table = format_table(res["rows"])
        print(table)
        if args.table:
            with open(args.table, "w") as f:
                f.write(table + "\n")
        if args.out:
            _write(args.out, res)
        return 0

    if args.smoke:  # before anything imports triton: @triton.jit reads it when the kernels are defined
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from benchmarks import gpu_timing

    if args.smoke:
        gpu_timing.configure(device="cpu", smoke=True)
    elif not torch.cuda.is_available():
        print("no CUDA device: GPU benchmarks not run (use --smoke to exercise them on the CPU)")
        return 0
    peak = None
    if args.peak and os.path.exists(args.peak):
        with open(args.peak) as f:
            peak = json.load(f).get("peak")
        gpu_timing.configure(peak=peak)
    peak = gpu_timing.calibrate()
    print(f"device {peak['device']}: bf16 matmul {peak['matmul_bf16_tflops']:.0f} TF/s, "
          f"copy {peak['copy_gbs']:.0f} GB/s", flush=True)
    meta = {"device": peak["device"], "commit": _commit(), "torch": torch.__version__, "peak": peak,
            "versions": versions(), "smoke": args.smoke}
    if args.calibrate:
        if args.out:
            _write(args.out, meta | {"rows": [], "failed": [], "benchmarks": {}})
        return 0

    rows, failed, info = [], [], {}
    part = open(args.partial, "a") if args.partial else None  # noqa: SIM115 (kept open across benchmarks)
    for name in _modules(args.only):
        t0 = time.time()
        if args.budget:
            gpu_timing.configure(budget_s=args.budget)
        n0 = len(rows)
        try:
            mod = importlib.import_module(f"benchmarks.gpu.bench_{name}")
            for r in mod.run(quick=args.quick):
                rows.append(r)
                if part:
                    part.write(json.dumps(r, default=str) + "\n")
                    part.flush()
            info[name] = {"status": "ok"}
        except Exception as e:  # noqa: BLE001  (one broken benchmark must not cost the others)
            failed.append(name)
            info[name] = {"status": f"failed: {type(e).__name__}: {str(e)[:200]}"}
            traceback.print_exc()
        info[name].update(seconds=round(time.time() - t0, 1), rows=len(rows) - n0)
        print(f"[bench {name}] {time.time() - t0:.1f}s, {len(rows) - n0} rows, {info[name]['status']}", flush=True)
        gpu_timing.empty_cache()
    if part:
        part.close()
    print(format_table(rows))
    if args.table:
        with open(args.table, "w") as f:
            f.write(format_table(rows) + "\n")
    if args.out:
        _write(args.out, meta | {"rows": rows, "failed": failed, "benchmarks": info,
                                 "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
