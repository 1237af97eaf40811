"""Two-turn rollouts with LoRA adapters: the plain model vs LoRA merged while sampling (what the engine does) vs
LoRA unmerged (peft's forward: three matmuls per projection), as a record.

    python benchmarks/lora_rollout_speed.py [--prompts 8] [--n 4] [--tokens 64] [--rounds 4]

SmolLM2-135M-Instruct (embedded), rank-16 adapters on the top 8 of 30 layers (the LoRA lever of
experiments/self-correction/sweeps.yaml), B = 0 as at the start of training, so all three variants draw the same tokens and do
the same work; the variants alternate in one process on one torch thread. Round 0 is a warm-up; ratios are
medians over the other rounds. Writes benchmarks/results/lora_rollout_speed.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.provenance import commit, machine

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "lora_rollout_speed.json")


def main(argv=None) -> int:
    from score_train.data.arithmetic import generate
    from score_train.model import load_model
    from score_train.prompts import turn1_message
    from score_train.rollout.engine import Engine
    from score_train.rollout.types import SamplingParams

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    plain, tok = load_model("embedded")
    lora, _ = load_model("embedded")
    lora.add_lora(16, 32.0, from_layer=lora.num_layers - 8)
    plain.eval()
    lora.eval()
    prompts = [turn1_message(r, "plain") for r in generate(args.prompts, "eval", seed=0)]
    params = SamplingParams(n=args.n, temperature=0.7, max_new_tokens=args.tokens, seed=0)
    engines = {"plain": Engine(plain, tok), "lora_merged": Engine(lora, tok)}

    class NoMerge:
        def __init__(self, m):
            self._m = m

        def __getattr__(self, k):
            return getattr(self._m, k)

        def adapters_merged(self):
            return contextlib.nullcontext(self._m)

    engines["lora_unmerged"] = Engine(lora, tok)
    engines["lora_unmerged"].model = NoMerge(lora)  # the runner still holds the model: peft's unmerged forward
    runs = {k: [] for k in engines}
    tokens = {}
    for r in range(args.rounds):
        for k, eng in engines.items():
            t = time.perf_counter()
            out = eng.generate(prompts, params)
            runs[k].append(round(time.perf_counter() - t, 3))
            tokens[k] = sum(len(s.turn1_ids) + len(s.turn2_ids) for s in out)
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in runs.items()), flush=True)
    if len(set(tokens.values())) != 1:
        raise RuntimeError(f"the variants drew different token counts {tokens}: not the same work")
    med = {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in runs.items()}
    rec = {"what": "two-turn Engine.generate, SmolLM2-135M-Instruct, rank-16 LoRA on the top 8 layers (B = 0), "
                   "alternating in one process, 1 torch thread",
           "shape": f"{args.prompts} prompts x n={args.n}, {args.tokens}+{args.tokens} new, T=0.7",
           "generated_tokens": tokens["plain"], "commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M"),
           "machine": machine(), "load_average_start": load0, "load_average_end": os.getloadavg()[0],
           "runs_s": runs, "median_s_after_warmup": med,
           "ratio_merged_over_plain": round(med["lora_merged"] / med["plain"], 3),
           "ratio_unmerged_over_plain": round(med["lora_unmerged"] / med["plain"], 3)}
    with open(OUT, "w") as f:
        json.dump(rec, f, indent=1)
    print(json.dumps({k: rec[k] for k in ("median_s_after_warmup", "ratio_merged_over_plain",
                                          "ratio_unmerged_over_plain")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
