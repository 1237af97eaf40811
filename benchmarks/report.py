"""Recorded benchmark runs -> BENCHMARKS.md tables and a chart.

    python -m benchmarks.report [--pytest-dir benchmarks/results/pytest] [--gpu-dir benchmarks/results]
                                [--out benchmarks/BENCHMARKS.md] [--chart benchmarks/results/benchmarks.png]

Reads
- pytest-benchmark saves (`pytest benchmarks/ --benchmark-save=NAME --benchmark-storage=file://...`,
  or `--benchmark-json FILE`): each paired test carries op, variant, shape, machine, device and peak
  extra memory in `extra_info`;
- GPU benchmark results (`python benchmarks/gpu_bench.py --out benchmarks/results/NAME.json`): rows of
  op, shape, variant, ms, frac_peak, extra_mem_gb; variants named naive*/torch*/reference*/hf* are the
  baselines, every other variant is compared with them;
- standalone paired summaries in benchmarks/results/*.json with `time_s` and `extra_peak_bytes`
  ({naive, ours}) such as benchmarks/cpu_logprobs.py writes, and the engine-vs-HF rollout summary
  ({engine, hf_generate} with tokens_per_s) of benchmarks/cpu_engine.py.
For each (op, shape, machine) only the newest record counts.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE_PREFIXES = ("naive", "torch", "reference", "hf", "baseline")


def _is_baseline(variant: str) -> bool:
    return variant.lower().startswith(BASELINE_PREFIXES)


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def read_pytest(path: str) -> list[dict]:
    """Pairs from one pytest-benchmark JSON file."""
    with open(path) as f:
        data = json.load(f)
    when = data.get("datetime", "")
    cpu = (data.get("machine_info") or {}).get("cpu", {}).get("brand_raw", "")
    groups: dict[tuple, dict] = {}
    for b in data.get("benchmarks", []):
        info = b.get("extra_info") or {}
        variant = info.get("variant") or (b.get("params") or {}).get("variant")
        if variant not in ("ours", "baseline"):
            continue
        op = info.get("op") or b.get("group") or b["name"].split("[")[0]
        device = info.get("device", "")
        machine = f"{cpu} ({device})" if cpu and info.get("machine", "cpu") == "cpu" else device or cpu
        key = (op, info.get("shape", ""), machine)
        g = groups.setdefault(key, {"op": op, "shape": key[1], "machine": machine, "when": when,
                                    "kind": info.get("machine", "cpu"), "source": os.path.basename(path)})
        g[f"{variant}_s"] = b["stats"]["median"]
        if info.get("paired_baseline_s"):  # the gate's interleaved baseline: the fairer pairing
            g["paired_baseline_s"] = info["paired_baseline_s"]
        if info.get("peak_extra_bytes") is not None:
            g[f"{variant}_mem"] = info["peak_extra_bytes"]
        if info.get("baseline_peak_extra_bytes") is not None:
            g["baseline_mem"] = info["baseline_peak_extra_bytes"]
    out = []
    for g in groups.values():
        if "paired_baseline_s" in g:
            g["baseline_s"] = g.pop("paired_baseline_s")
        if "ours_s" in g and "baseline_s" in g:
            g["time_ratio"] = _ratio(g["ours_s"], g["baseline_s"])
            g["mem_ratio"] = _ratio(g.get("ours_mem"), g.get("baseline_mem"))
            out.append(g)
    return out


def read_summary(path: str, data: dict) -> list[dict]:
    """One pair from a standalone benchmark script's summary (e.g. benchmarks/cpu_logprobs.py):
    {"op"?, "shape", "time_s": {naive|baseline, ours}, "extra_peak_bytes": {...}, "machine", "time"}."""
    t, mem = data["time_s"], data.get("extra_peak_bytes") or {}
    base = next((k for k in t if _is_baseline(k)), None)
    if base is None or "ours" not in t:
        return []
    shp = data.get("shape", "")
    if isinstance(shp, dict):
        shp = " ".join(f"{k}={v}" for k, v in shp.items() if not isinstance(v, bool))
    m = data.get("machine", "")
    if isinstance(m, dict):
        m = " ".join(f"{v} {k}" if k == "threads" else str(v) for k, v in m.items())
    stem = os.path.splitext(os.path.basename(path))[0]
    return [{"op": data.get("op", stem.removeprefix("cpu_").removeprefix("gpu_")), "shape": shp, "machine": m,
             "kind": "cpu" if stem.startswith("cpu") else "gpu", "when": str(data.get("time", "")),
             "source": os.path.basename(path), "ours_s": t["ours"], "baseline_s": t[base],
             "time_ratio": _ratio(t["ours"], t[base]), "ours_mem": mem.get("ours"), "baseline_mem": mem.get(base),
             "mem_ratio": _ratio(mem.get("ours"), mem.get(base))}]


def read_rollout_summary(path: str, data: dict) -> list[dict]:
    """The engine-vs-HF two-turn rollout summary (benchmarks/cpu_engine.py): time per generated token,
    since the two sides sample different lengths."""
    e, h, c = data["engine"], data["hf_generate"], data.get("config", {})
    shp = (f"{c.get('model', '')}: {c.get('prompts')} prompts x n={c.get('n')}, {c.get('max_new_tokens_per_turn')}"
           f"+{c.get('max_new_tokens_per_turn')} new, per generated token")
    if "engine_compute_dtype" in c:  # records since the bf16 option: fp32 and bf16 pairs are separate rows
        shp += f"; engine {c['engine_compute_dtype']} vs HF {c.get('hf_dtype', 'float32')}"
    kind = "gpu" if "cuda" in str(c.get("torch", "")) or c.get("device") else "cpu"
    where = str(c.get("machine", "")).split(", load average")[0]  # "2 cores (CPU model; bf16 units)"
    machine = c.get("device") or f"{where or str(c.get('cpus', '?')) + ' cores'}, {c.get('threads', '?')} thread(s)"
    o, b = 1 / e["tokens_per_s"], 1 / h["tokens_per_s"]
    return [{"op": "engine (two-turn rollout)", "shape": shp, "machine": machine, "kind": kind,
             "when": str(c.get("time", "")), "source": os.path.basename(path), "ours_s": o, "baseline_s": b,
             "time_ratio": o / b, "mem_ratio": None}]


def read_gpu(path: str) -> list[dict]:
    """Pairs from one benchmarks/gpu_bench.py result file: every non-baseline variant vs the baseline."""
    with open(path) as f:
        data = json.load(f)
    if "time_s" in data:
        return read_summary(path, data)
    if "engine" in data and "hf_generate" in data:
        return read_rollout_summary(path, data)
    rounds = [r for r in data.get("rounds", [])
              if "engine" in r and "hf_generate" in r] if isinstance(data, dict) else []
    if rounds:  # benchmarks/cpu_engine.py's per-round records: the round of median speed-up
        mid = sorted(rounds, key=lambda r: r["engine"]["tokens_per_s"] / r["hf_generate"]["tokens_per_s"])
        return read_rollout_summary(path, dict(mid[(len(mid) - 1) // 2], config=data.get("config", {})))
    if "rows" not in data:
        return []
    by_shape: dict[tuple, list] = {}
    for r in data["rows"]:
        if "error" in r or "ms" not in r:
            continue
        by_shape.setdefault((r["op"], r["shape"]), []).append(r)
    out = []
    for (op, shp), rows in by_shape.items():
        bases = [r for r in rows if _is_baseline(r["variant"])]
        if not bases:
            continue
        base = bases[0]
        for r in rows:
            if _is_baseline(r["variant"]):
                continue
            b_mem, o_mem = base.get("extra_mem_gb"), r.get("extra_mem_gb")
            out.append({
                "op": op if r["variant"] == "ours" else f"{op} ({r['variant']})",
                "shape": shp, "machine": data.get("device", "gpu"), "when": data.get("time", ""),
                "kind": "gpu", "source": os.path.basename(path), "ours_s": r["ms"] / 1e3, "baseline_s": base["ms"] / 1e3,
                "baseline_name": base["variant"], "time_ratio": _ratio(r["ms"], base["ms"]),
                "mem_ratio": _ratio(o_mem, b_mem) if b_mem else None,
                "ours_mem": None if o_mem is None else o_mem * 1e9,
                "baseline_mem": None if b_mem is None else b_mem * 1e9,
                "roofline": r.get("frac_peak"), "variant": r["variant"],
            })
    return out


def collect(pytest_dir: str, gpu_dir: str) -> list[dict]:
    recs = []
    for p in sorted(glob.glob(os.path.join(pytest_dir, "**", "*.json"), recursive=True)):
        recs += read_pytest(p)
    for p in sorted(glob.glob(os.path.join(gpu_dir, "*.json"))):
        recs += read_gpu(p)
    newest: dict[tuple, dict] = {}
    for r in recs:
        k = (r["op"], r["shape"], r["machine"])
        if k not in newest or r["when"] >= newest[k]["when"]:
            newest[k] = r
    return sorted(newest.values(), key=lambda r: (r["op"], r["machine"], r["shape"]))


def _t(s):
    if s is None:
        return "-"
    return f"{s * 1e6:.0f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def _mem(b):
    return "-" if b is None else f"{b / 2**20:.1f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def _x(r):
    return "-" if r is None else f"{r:.2f}"


def render_markdown(recs: list[dict], chart: str | None) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m benchmarks.report` from recorded runs; do not edit by hand.",
        "Each row pairs our op with the baseline a user would otherwise run, measured in the same run on the",
        "same machine. ratio = ours / baseline (median of rounds): below 1 is faster or smaller.",
        "Roofline is the fraction of the measured peak (bf16 matmul TF/s or copy GB/s) on GPUs.",
        "",
    ]
    if chart:
        lines += [f"![speed-up and memory ratio per op]({chart})", ""]
    lines += [
        ("| op | shape | machine | ours | baseline | time ratio | speed-up | peak extra mem ours / baseline | "
         "memory ratio | roofline | record |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        speed = None if not r.get("time_ratio") else 1 / r["time_ratio"]
        roof = "-" if r.get("roofline") is None else f"{100 * r['roofline']:.0f}%"
        mem = f"{_mem(r.get('ours_mem'))} / {_mem(r.get('baseline_mem'))}"
        lines.append(f"| {r['op']} | {r['shape']} | {r['machine']} | {_t(r['ours_s'])} | {_t(r['baseline_s'])} | "
                     f"{_x(r['time_ratio'])} | {_x(speed)}x | {mem} | {_x(r.get('mem_ratio'))} | {roof} | "
                     f"{r['source']} {r['when'][:19]} |")
    if not recs:
        lines.append("| (no recorded runs) | | | | | | | | | | |")
    return "\n".join(lines) + "\n"


def _short_machine(r: dict) -> str:
    m = r["machine"]
    if r.get("kind") == "gpu":
        return m.removeprefix("NVIDIA ")
    inner = m[m.rfind("(") + 1:m.rfind(")")] if m.endswith(")") else m
    return f"CPU, {inner}"


def render_chart(recs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    labels = [f"{r['op']}\n{_short_machine(r)}" for r in recs]
    speed = [1 / r["time_ratio"] if r.get("time_ratio") else None for r in recs]
    mem = [r.get("mem_ratio") for r in recs]
    h = max(2.5, 0.45 * len(recs) + 1.2)
    fig, axes = plt.subplots(1, 2, figsize=(12, h), sharey=True)
    y = list(range(len(recs)))
    panels = ((axes[0], speed, "speed-up: baseline time / ours (higher is better)", "tab:blue"),
              (axes[1], mem, "peak extra memory: ours / baseline (lower is better)", "tab:orange"))
    for ax, vals, title, colour in panels:
        pos = [v for v in vals if v]
        lo, hi = min(pos + [0.5]) / 1.6, max(pos + [2.0]) * 1.6
        # zero (ours allocates nothing measurable) sits at the axis floor; None (not measured) is blank
        shown = [None if v is None else max(v, lo * 1.05) for v in vals]
        # bars grow from the 1x line, so better-than-baseline and worse read apart at a glance
        ax.barh(y, [v - 1 if v else 0 for v in shown], left=1, color=colour)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: ""))
        ax.set_title(title, fontsize=10)
        for yi, v, sv in zip(y, vals, shown):
            if v is not None:
                ax.text(sv, yi, f" {v:.2f}" if v >= 0.005 else " ~0", va="center", fontsize=7)
    axes[0].set_yticks(y, labels, fontsize=7)
    axes[0].invert_yaxis()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ratio_summary(paths: list[str], thresholds: dict) -> str:
    """Every recorded ratio per op (not only the newest), beside its threshold: what thresholds are
    set from (see docs/perf-regression.md)."""
    seen: dict[tuple, dict] = {}
    for p in paths:
        for r in read_pytest(p):
            d = seen.setdefault((r["op"], r["kind"]), {"time": [], "memory": []})
            if r.get("time_ratio") is not None:
                d["time"].append(r["time_ratio"])
            if r.get("mem_ratio") is not None:
                d["memory"].append(r["mem_ratio"])
    head = (f"{'op':<22} {'machine':<7} {'n':>3}  {'time ratio min/med/max':<24} {'limit':>6}  "
            f"{'memory ratio min/med/max':<24} {'limit':>6}")
    lines = [head]
    for (op, kind), d in sorted(seen.items()):
        lim = (thresholds.get(kind) or {}).get(op) or {}

        def rng(v):
            return "-" if not v else f"{min(v):.3f}/{sorted(v)[len(v) // 2]:.3f}/{max(v):.3f}"

        lines.append(f"{op:<22} {kind:<7} {len(d['time']):>3}  {rng(d['time']):<24} {lim.get('time', '-')!s:>6}  "
                     f"{rng(d['memory']):<24} {lim.get('memory', '-')!s:>6}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pytest-dir", default=os.path.join(ROOT, "benchmarks", "results", "pytest"))
    p.add_argument("--gpu-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "BENCHMARKS.md"))
    p.add_argument("--chart", default=os.path.join(ROOT, "benchmarks", "results", "benchmarks.png"))
    p.add_argument("--ratios", nargs="*", metavar="JSON",
                   help="instead: print every ratio recorded in these pytest-benchmark JSON files (default: "
                        "all saves under --pytest-dir) beside benchmarks/thresholds.yaml")
    a = p.parse_args(argv)
    if a.ratios is not None:
        import yaml

        paths = a.ratios or sorted(glob.glob(os.path.join(a.pytest_dir, "**", "*.json"), recursive=True))
        with open(os.path.join(ROOT, "benchmarks", "thresholds.yaml")) as f:
            print(ratio_summary(paths, yaml.safe_load(f) or {}))
        return 0
    recs = collect(a.pytest_dir, a.gpu_dir)
    rel = None
    if recs and a.chart:
        render_chart(recs, a.chart)
        rel = os.path.relpath(os.path.abspath(a.chart), os.path.dirname(os.path.abspath(a.out)))
    with open(a.out, "w") as f:
        f.write(render_markdown(recs, rel))
    print(f"{len(recs)} paired records -> {a.out}" + (f", {a.chart}" if rel else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
