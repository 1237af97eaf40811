"""CPU throughput: the paged two-turn engine vs Hugging Face `generate` on the same work.

    python benchmarks/cpu_engine.py [--prompts 32] [--n 4] [--max-new-tokens 96] [--hf-batch 64] [--rounds 3]
    python benchmarks/cpu_engine.py --compute-dtype bfloat16 [--hf-dtype bfloat16] --out .../cpu_engine_bf16.json

SmolLM2-135M-Instruct (the embedded GGUF, fp32), arithmetic prompts x n samples, two turns,
temperature 1.0. HF does turn 1 for all samples (left-padded batches of --hf-batch sequences), then
turn 2 on the concatenated ids. Each round runs the engine then HF in this one process (a shared,
loaded machine drifts between runs, so only ratios measured side by side mean something); reports
generated tokens per second of each, the per-round ratios and their median, and writes
benchmarks/results/cpu_engine.json (rewritten after every round). --compute-dtype bfloat16 runs the engine as the
trainer's rollout.dtype=bfloat16 does (bf16 copies of the fp32 weights per call); --hf-dtype loads a separate
model in that dtype for HF, so that the ratio can be read against HF in the same precision.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from benchmarks.provenance import machine
from score_train.model import load_model
from score_train.rollout.engine import Engine
from score_train.rollout.hf_baseline import HFRollout
from score_train.rollout.types import SamplingParams


def arithmetic_prompts(k: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    ops = ["+", "-", "*"]
    return [f"What is {rng.randint(10, 99)} {rng.choice(ops)} {rng.randint(10, 99)}?" for _ in range(k)]


def summary(samples, seconds):
    gen = sum(len(s.turn1_ids) + len(s.turn2_ids or []) for s in samples)
    reasons = {}
    for s in samples:
        for t, r in enumerate(s.finish_reasons):
            reasons[f"turn{t + 1}_{r}"] = reasons.get(f"turn{t + 1}_{r}", 0) + 1
    return {"seconds": round(seconds, 2), "generated_tokens": gen, "tokens_per_s": round(gen / seconds, 1),
            "mean_turn1_len": round(sum(len(s.turn1_ids) for s in samples) / len(samples), 1),
            "mean_turn2_len": round(sum(len(s.turn2_ids or []) for s in samples) / len(samples), 1),
            "finish_reasons": reasons}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--hf-batch", type=int, default=64)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--rounds", type=int, default=3, help="engine-then-HF rounds; the median ratio is reported")
    p.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="the engine's sampling dtype over the fp32 model (the trainer's rollout.dtype)")
    p.add_argument("--hf-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="HF generate's model dtype (bfloat16: a second model, loaded in bf16)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (1 wins on an oversubscribed machine: OpenMP barriers stall)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "cpu_engine.json"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.time()
    model, tok = load_model("embedded", dtype=torch.float32)
    print(f"loaded in {time.time() - t:.1f}s; torch threads {torch.get_num_threads()}", flush=True)
    prompts = arithmetic_prompts(args.prompts)
    params = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=1)
    warm = SamplingParams(n=2, temperature=1.0, max_new_tokens=4)

    eng = Engine(model, tok, compute_dtype=getattr(torch, args.compute_dtype))
    eng.generate(prompts[:2], warm)
    hf = None
    if not args.skip_hf:
        hf_model = model if args.hf_dtype == "float32" else load_model("embedded", dtype=getattr(torch, args.hf_dtype))[0]
        hf = HFRollout(hf_model, tok, batch_size=args.hf_batch)
        hf.generate(prompts[:2], warm)
    res = {"rounds": []}
    for r in range(args.rounds):
        t = time.perf_counter()
        out = eng.generate(prompts, params)
        phases = {k: v for k, v in eng.stats.items() if k.startswith(("prompt_", "turn"))}
        row = {"engine": summary(out, time.perf_counter() - t) | {"phases": phases, "steps": eng.stats["steps"],
                                                                   "forward_tokens": sum(phases.values())}}
        print(f"round {r} engine", row["engine"], flush=True)
        if hf is not None:
            t = time.perf_counter()
            ref = hf.generate(prompts, params)
            row["hf_generate"] = summary(ref, time.perf_counter() - t) | {
                "batch_size": args.hf_batch, "forward_tokens": hf.stats["forward_tokens"]}
            print(f"round {r} hf", row["hf_generate"], flush=True)
            row["speedup_tokens_per_s"] = round(row["engine"]["tokens_per_s"] / row["hf_generate"]["tokens_per_s"], 2)
            print(f"round {r} speedup {row['speedup_tokens_per_s']}x", flush=True)
        res["rounds"].append(row)
        if hf is not None:
            res["speedup_tokens_per_s_median"] = statistics.median(x["speedup_tokens_per_s"] for x in res["rounds"])
        _write(args, res)
    return 0


def _write(args, res) -> None:
    res["config"] = {"model": "SmolLM2-135M-Instruct (embedded GGUF, fp32)", "engine_compute_dtype": args.compute_dtype,
                     "hf_dtype": args.hf_dtype, "prompts": args.prompts, "n": args.n,
                     "max_new_tokens_per_turn": args.max_new_tokens, "temperature": 1.0, "two_turn": True,
                     "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                     "time": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": _commit(),
                     "machine": f"{machine()}, {os.getloadavg()[0]:.1f} at the end"}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


def _commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=False).stdout.strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
