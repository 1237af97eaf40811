"""How far the two CPU speed ratios can go on this machine: matmul FLOPs counted, the matmul peak measured.

    python benchmarks/cpu_floor.py [--part all|step|rollout] [--prompts 32] [--n 4] [--max-new-tokens 96]

For each timed pair (the demo's update step, today's `train_step` vs the frozen baseline step; two-turn
rollouts, the paged engine vs HF `generate`), on one torch thread, in fp32:
- `time_s`: the median of 3 plain calls of each side (the step) or one call (rollouts), in this process;
- `matmul_gflop`: the matmul FLOPs each side executes in one call: for the step from a torch.profiler trace
  with_flops=True (aten::mm / addmm / bmm as executed, fused custom ops included: the profiler sees their internal
  matmuls), with `matmul_share`, the fraction of the profiled self time spent in them; for rollouts from torch's
  FlopCounterMode (mm / addmm / bmm at the dispatcher: attention, a few %, is left out on both sides);
- `peak_gflops`: this CPU's best single-thread fp32 GEMM rate over the shapes the two sides run;
- `floor_s` = matmul_gflop / peak_gflops: the time of that side if every matmul ran at the peak and everything
  else were free;
- `best_ratio` = floor_s(ours) / time_s(baseline) (the step) or time_s(HF) / floor_s(engine) (rollouts): the best
  ratio that today's computation could reach on this CPU, against the target (0.5 for the step, 3 for rollouts).
Writes benchmarks/results/cpu_floor.json. A measurement, not a test: about 12 minutes on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from benchmarks.provenance import commit, machine

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu_floor.json")
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm", "aten::addmm_")
# the GEMMs of the two sides: (M, K, N) of the SmolLM2-135M projections at the step's and decode's row counts,
# and the lm head over the step's policy tokens
PEAK_SHAPES = ((1248, 576, 1536), (1248, 576, 576), (512, 576, 49152), (128, 576, 1536), (64, 576, 49152))


def matmul_profile(fn) -> dict:
    """One call of fn under the profiler: matmul FLOPs (as executed) and their share of the self time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        fn()
    flops = mm_us = total_us = 0.0
    for e in prof.key_averages():
        total_us += e.self_cpu_time_total
        if e.key in MATMULS:
            flops += e.flops or 0
            mm_us += e.self_cpu_time_total
    return {"matmul_flops": int(flops), "matmul_gflop": round(flops / 1e9, 2), "matmul_share": round(mm_us / max(total_us, 1e-9), 3),
            "profiled_s": round(total_us / 1e6, 2)}


def matmul_count(fn) -> dict:
    """One call of fn under torch's FlopCounterMode: matmul FLOPs (mm / addmm / bmm) with no event log (a
    profiler trace of a whole rollout does not fit in 24 GB). It counts at the dispatcher, so it does not see inside
    custom ops: the engine's paged attention (a few % of its FLOPs) is left out, and HF's attention is left out
    likewise (only these three ops are summed on both sides)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    flops = sum(v for k, v in fc.get_flop_counts()["Global"].items()
                if str(k).split(".")[-1] in ("mm", "addmm", "bmm"))
    return {"matmul_flops": int(flops), "matmul_gflop": round(flops / 1e9, 2)}


def peak_gflops(shapes=PEAK_SHAPES, reps: int = 5) -> dict:
    """Best single-thread fp32 GEMM rate over shapes (the most favourable one sets the floor)."""
    rates = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        best = min(_time(lambda a=a, b=b: a @ b) for _ in range(reps))
        rates[f"{m}x{k}x{n}"] = round(2 * m * k * n / best / 1e9, 1)
    return {"per_shape": rates, "peak": max(rates.values())}


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def floor(side: dict, peak: float) -> dict:
    side["floor_s"] = round(side["matmul_gflop"] / peak, 3)  # GFLOP / (GFLOP/s)
    side["achieved_matmul_gflops"] = round(side["matmul_gflop"] / side["time_s"], 1)
    return side


def part_step(peak: float) -> dict:
    from benchmarks.test_bench_train import case_train_step_demo

    case = case_train_step_demo("cpu", B=8)
    out = {"shape": case["shape"]}
    for v in ("baseline", "ours"):
        case[v]()  # warm-up
    times = {v: [] for v in ("baseline", "ours")}
    for _ in range(3):
        for v, ts in times.items():
            ts.append(_time(case[v]))
    for v in ("baseline", "ours"):
        out[v] = floor(matmul_profile(case[v]) | {"time_s": round(statistics.median(times[v]), 3)}, peak)
        print(v, out[v], flush=True)
    out["time_ratio"] = round(out["ours"]["time_s"] / out["baseline"]["time_s"], 3)
    out["flop_ratio"] = round(out["ours"]["matmul_gflop"] / out["baseline"]["matmul_gflop"], 3)
    out["best_ratio"] = round(out["ours"]["floor_s"] / out["baseline"]["time_s"], 3)
    out["target"] = "<= 0.5"
    return out


def part_rollout(peak: float, prompts: int, n: int, max_new: int) -> dict:
    from benchmarks.cpu_engine import arithmetic_prompts
    from score_train.model import load_model
    from score_train.rollout.engine import Engine
    from score_train.rollout.hf_baseline import HFRollout
    from score_train.rollout.types import SamplingParams

    model, tok = load_model("embedded", dtype=torch.float32)
    ps = arithmetic_prompts(prompts)
    params = SamplingParams(n=n, temperature=1.0, max_new_tokens=max_new, seed=1)
    eng, hf = Engine(model, tok), HFRollout(model, tok, batch_size=64)
    warm = SamplingParams(n=2, temperature=1.0, max_new_tokens=4)
    eng.generate(ps[:2], warm)
    hf.generate(ps[:2], warm)
    out = {"shape": f"SmolLM2-135M fp32, {prompts} prompts x n={n}, {max_new} + {max_new} new tokens, T=1.0"}
    for name, r in (("engine", eng), ("hf_generate", hf)):
        t0 = time.perf_counter()
        samples = r.generate(ps, params)
        t = time.perf_counter() - t0
        gen = sum(len(s.turn1_ids) + len(s.turn2_ids or []) for s in samples)
        side = matmul_count(lambda r=r: r.generate(ps, params)) | {"time_s": round(t, 2), "generated_tokens": gen}
        out[name] = floor(side, peak)
        print(name, out[name], flush=True)
    e, h = out["engine"], out["hf_generate"]

    def rate(side: dict, seconds: float) -> float:  # generated tokens/s
        return side["generated_tokens"] / seconds

    out["speedup_tokens_per_s"] = round(rate(e, e["time_s"]) / rate(h, h["time_s"]), 2)
    out["flop_ratio"] = round(e["matmul_gflop"] / h["matmul_gflop"], 3)
    out["matmul_gflop_per_token"] = {k: round(out[k]["matmul_gflop"] / out[k]["generated_tokens"], 3)
                                     for k in ("engine", "hf_generate")}
    # the engine with every matmul at the peak and nothing else, against HF as measured (tokens/s)
    out["best_speedup"] = round(rate(e, e["floor_s"]) / rate(h, h["time_s"]), 2)
    out["target"] = ">= 3x"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", default="all", choices=("all", "step", "rollout"))
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    pk = peak_gflops()
    print("peak", pk, flush=True)
    rec = {"what": "issue 14: the FLOP floor of the update step and of two-turn rollouts on this CPU (fp32, 1 thread)",
           "commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
           "load_average_start": os.getloadavg()[0], "peak_gflops": pk}
    if args.part in ("all", "step"):
        rec["step"] = part_step(pk["peak"])
    if args.part in ("all", "rollout"):
        rec["rollout"] = part_rollout(pk["peak"], args.prompts, args.n, args.max_new_tokens)
    rec["load_average_end"] = os.getloadavg()[0]
    with open(OUT, "w") as f:
        json.dump(rec, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
