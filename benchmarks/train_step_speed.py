"""The demo's optimisation step, today's trainer vs the frozen baseline step (benchmarks/baseline_train_step.py),
as a record.

    python benchmarks/train_step_speed.py [--B 8] [--rounds 5] [--autocast]

Runs benchmarks/test_bench_train.py's `case_train_step_demo` (SmolLM2-135M's shape, random weights, top 8 of 30
layers trained, SCoRe Stage II with the k3 KL, T=0.7; today's step gets the samples as the paged engine returns
them, with the frozen prefix it already ran), alternating baseline and ours in one process on one torch thread,
and writes benchmarks/results/train_step_speed.json (keeping the earlier measurements under "history").
Round 0 is a warm-up; the ratio is median(ours) / median(baseline) over the other rounds. --autocast also times
today's step under model.autocast_bf16 (same samples, its own model copy) and records its ratio beside.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.provenance import commit, machine
from benchmarks.test_bench_train import case_train_step_demo

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "train_step_speed.json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--autocast", action="store_true", help="also time the step under model.autocast_bf16")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    case = case_train_step_demo("cpu", B=args.B, autocast=args.autocast)
    runs = {v: [] for v in ("baseline", "ours", "ours_autocast") if v in case}
    for r in range(args.rounds):
        for v in runs:
            t = time.perf_counter()
            case[v]()
            runs[v].append(round(time.perf_counter() - t, 3))
        print(f"round {r}: " + ", ".join(f"{v} {x[-1]:.2f} s" for v, x in runs.items()), flush=True)
    med = {v: statistics.median(x[1:] if len(x) > 1 else x) for v, x in runs.items()}
    ratio = med["ours"] / med["baseline"]
    print(f"ours / baseline = {ratio:.3f} (target <= 0.5)")
    old = {}
    if os.path.exists(OUT):
        with open(OUT) as f:
            old = json.load(f)
    history = old.pop("history", [])
    rec = {"what": "issue 14: the demo's optimisation step, today's train_step (samples with the engine's frozen-prefix "
                   "residuals, rollout.reuse_prefix) vs the step at 693d5f9 (benchmarks/baseline_train_step.py), "
                   "same samples, alternating in one process, 1 torch thread",
           "shape": case["shape"], "commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M"),
           "machine": machine(), "load_average_start": load0, "load_average_end": os.getloadavg()[0],
           "runs_s": runs, "median_s_after_warmup": med, "ratio_ours_over_693d5f9": round(ratio, 3),
           "target": "<= 0.5 (2x)", "met": ratio <= 0.5, "history": history + ([old] if old else [])}
    if "ours_autocast" in med:
        rec["ratio_ours_autocast_over_693d5f9"] = round(med["ours_autocast"] / med["baseline"], 3)
        rec["autocast_note"] = ("model.autocast_bf16: fp32 weights, bf16 matmuls in the trained layers (the fused "
                                "log-probs upcast to fp32); a speed-up only on CPUs with bf16 units (machine)")
        print(f"ours (autocast bf16) / baseline = {rec['ratio_ours_autocast_over_693d5f9']:.3f}")
    with open(OUT, "w") as f:
        json.dump(rec, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
