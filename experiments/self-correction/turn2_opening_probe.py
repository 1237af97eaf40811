"""Which fixed turn-2 instruction and reply opening makes the base model re-derive its answer?

The base model's greedy turn 1 on N problems of the *train* split (the choice of the demo's turn-2 text must not
be tuned on the held-out problems it is measured on), then, after that same turn 1, a greedy turn 2 under each
candidate: a fixed instruction (the user message after turn 1) and a fixed opening of the reply (`reply_prefix`,
text the model continues; "" = none). Each candidate gets the evaluation's metrics (Acc@t2, delta among stated
answers, stated corrections and how many of them had the right number in turn 1 already, breakages, turns cut),
read from what the model wrote after the opening.

    python experiments/self-correction/turn2_opening_probe.py [--n=512] [--threads=2]
        [--out=experiments/self-correction/records/demo_turn2_opening_probe.json]

Recorded: records/demo_turn2_opening_probe.json; the demo preset took the best delta among stated answers
(REPORT.md, "The turn-2 opening").
"""
from __future__ import annotations

import argparse
import json
import time

import score_api as api
import torch

SOLVE_AGAIN = "Please solve the problem again."
RECOMPUTE = "Let me recompute: "
# name -> (instruction, reply opening)
CANDIDATES = {
    "the task's instruction": (api.ARITHMETIC_SELF_CORRECT, ""),
    "the task's instruction, opened": (api.ARITHMETIC_SELF_CORRECT, RECOMPUTE),
    "the task's instruction, opened without the space": (api.ARITHMETIC_SELF_CORRECT, RECOMPUTE.rstrip()),
    "solve again": (SOLVE_AGAIN, ""),
    "solve again, opened (the demo preset)": (SOLVE_AGAIN, RECOMPUTE),
}


def turn2_after(eng, turn1, prompts: list[str], instruction: str, reply_prefix: str, max_new_tokens: int):
    """Greedy turn 2 after the given turns 1 (Episode list from a one-turn generate), under one candidate:
    the same ids a two-turn generate builds (ChatFormat.suffix_ids), so turn 1 is shared by every candidate."""
    ids = [s.prompt_ids + s.turn1_ids + api.ChatFormat.instruction_ids(
               eng.chat.suffix_ids(p, instruction, reply_prefix), s.turn1_ids, eng.eos_ids)
           for s, p in zip(turn1, prompts)]
    return eng.generate_ids(ids, api.SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens))


def candidate_metrics(kind: str, recs, turn1, turn2) -> dict:
    """The evaluation's self-correction metrics for turn 1 / turn 2 pairs (turn2: one-turn samples whose turn-1
    fields hold the turn 2), with the texts of every stated correction and breakage."""
    r1 = [api.reward(kind, s.turn1_text, r) for s, r in zip(turn1, recs)]
    r2 = [api.reward(kind, s.turn1_text, r) for s, r in zip(turn2, recs)]
    stated = [api.turn1_stated(kind, s.turn1_text, s.finish_reasons[0]) for s in turn1]
    m = api.self_correction_metrics(
        r1, r2, stated, cut_t1=[s.finish_reasons[0] == "length" for s in turn1],
        cut_t2=[s.finish_reasons[0] == "length" for s in turn2],
        written=[api.wrote_answer(kind, s.turn1_text, r.answer) for s, r in zip(turn1, recs)])
    flips = [{"problem": r.problem, "y1": a.turn1_text, "y2": b.turn1_text, "r1": x, "r2": y}
             for a, b, r, x, y, st in zip(turn1, turn2, recs, r1, r2, stated) if st and x != y]
    return {"metrics": m, "flips": flips}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default="embedded")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = api.load_model(args.spec)
    model.eval()
    eng = api.Engine(model, tok)
    recs = api.load_records(api.DataConfig(task="arithmetic"), "train", args.n)
    prompts = [api.turn1_message(r) for r in recs]
    t0 = time.time()
    turn1 = eng.generate(prompts, api.SamplingParams(n=1, temperature=0.0, max_new_tokens=args.max_new_tokens),
                         two_turn=False)
    rec = {"spec": args.spec, "split": "train", "n": len(recs), "max_new_tokens": args.max_new_tokens,
           "commit": api.commit(), "machine": api.machine(), "turn1_seconds": round(time.time() - t0, 1), "candidates": {}}
    for name, (instruction, opening) in CANDIDATES.items():
        t0 = time.time()
        turn2 = turn2_after(eng, turn1, prompts, instruction, opening, args.max_new_tokens)
        c = candidate_metrics("arithmetic", recs, turn1, turn2)
        rec["candidates"][name] = {"instruction": instruction, "reply_prefix": opening,
                                   "seconds": round(time.time() - t0, 1), **c}
        m = c["metrics"]
        print(json.dumps({"candidate": name, **{k: m[k] for k in (
            "acc_t1", "acc_t2", "delta_stated", "n_i2c_stated", "n_i2c_stated_written", "n_c2i_stated", "cut_t2")}}),
            flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rec, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
