"""Can the model tell its right answers from its wrong ones? (the error signal self-correction needs)

For N held-out problems of a task: the model's greedy turn 1 under the task's prompt, then a yes/no question after
it ("Is the answer above right? Answer yes or no."). Its score is log P(yes) - log P(no) at the first token of the
reply (each side summed over the tokenizer's one-token spellings: "Yes", " yes", ...). The AUC of that score
between right and wrong turns 1 is the probe: 0.5 means the model's own judgement carries no information about
which of its answers are wrong, so a turn 2 has nothing to base a selective correction on. A second check asks
the same question of the bare equation with the true result against one off by 10 (by 1 for one-digit results),
without any turn 1: can the model check a stated sum at all?

For two-operand additions it also measures the order effect: greedy accuracy when the reply is made to start with
the written equation in each operand order ("a + b = ", "b + a = ", larger first, smaller first), and how many
answers a turn 2 that always re-added in another order would fix and break (i->c / c->i against the question's
order): the one check-by-another-method this model does better than its first attempt.

    python experiments/self-correction/verification_probe.py [--spec=embedded] [--n=512] [--threads=2]
        [--tasks=all|demo] [--out=experiments/self-correction/records/demo_verification_probe.json]

Recorded: records/demo_verification_probe.json (the base model, four tasks) and
records/demo_verification_probe_trained.json (finished lever runs, exported with `sweep.py export`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import score_api as api
import torch

QUESTION = "Is the answer above right? Answer yes or no."
# name -> DataConfig overrides; "demo" is the preset's task
TASKS = {
    "demo: two-digit a + b": {},
    "four one-digit numbers, +": {"digits": 1, "n_operands": 4},
    "three one-digit numbers, + and *": {"digits": 1, "n_operands": 3, "ops": ["+", "*"]},
    "two-digit a - b": {"ops": ["-"]},
}
ORDERS = {
    "question's order": lambda a, b: f"{a} + {b} = ",
    "other order": lambda a, b: f"{b} + {a} = ",
    "larger first": lambda a, b: f"{max(a, b)} + {min(a, b)} = ",
    "smaller first": lambda a, b: f"{min(a, b)} + {max(a, b)} = ",
}


def auc(pos: list[float], neg: list[float]) -> float:
    """P(score of a random positive > score of a random negative), ties half (Mann-Whitney); nan if a side is empty."""
    if not pos or not neg:
        return float("nan")
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def one_token_ids(tok, words: list[str]) -> list[int]:
    """Ids of the spellings of words (bare and with a leading space) that are a single token."""
    out = set()
    for w in words:
        for v in (w, " " + w):
            ids = tok.encode(v, add_special_tokens=False)
            if len(ids) == 1:
                out.add(ids[0])
    return sorted(out)


@torch.no_grad()
def yes_no_margins(model, tok, conversations: list[list[dict]], yes: list[int], no: list[int],
                   batch: int = 32) -> list[float]:
    """log P(yes) - log P(no) at the first token of the assistant's reply to each conversation (the chat
    template's layout); left-padded batches, so every reply's first token is the last column."""
    out = []
    for i in range(0, len(conversations), batch):
        ids = []
        for msgs in conversations[i:i + batch]:
            x = tok.apply_chat_template(msgs, add_generation_prompt=True)
            ids.append(list(x["input_ids"] if hasattr(x, "keys") else x))
        T = max(map(len, ids))
        inp = torch.tensor([[tok.pad_token_id or 0] * (T - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in ids])
        lp = torch.log_softmax(model.logits(model(inp, attention_mask=mask)[:, -1]).float(), -1)
        out += (torch.logsumexp(lp[:, yes], 1) - torch.logsumexp(lp[:, no], 1)).tolist()
    return out


def expression(record) -> str:
    """The arithmetic record's expression ("37 + 45"), as the data module stored it."""
    return record.meta["expr"]


def off_by(answer: int, key: str) -> int:
    """A wrong result a careless adder writes: 10 away (1 for one-digit results), the side fixed by the text."""
    step = 10 if abs(answer) >= 10 else 1
    return answer + (step if sum(map(ord, key)) % 2 else -step)


def flips(a: list[float], b: list[float]) -> dict:
    return {"i2c": sum(1 for x, y in zip(a, b) if x == 0 and y == 1),
            "c2i": sum(1 for x, y in zip(a, b) if x == 1 and y == 0)}


def eval_split_size(data) -> int:
    """Distinct problems in an arithmetic eval split (the three-operand one-digit task has 421); a space too big to
    list counts as unlimited."""
    arith = api.ArithmeticConfig(digits=data.digits, n_operands=data.n_operands, ops=tuple(data.ops))
    exprs = api.arithmetic.split_expressions("eval", arith)
    return 10**9 if exprs is None else len(exprs)


def probe_task(model, tok, eng, overrides: dict, n: int, orders: bool = True) -> dict:
    cfg = api.DataConfig(task="arithmetic", **overrides)
    recs = api.load_records(cfg, "eval", min(n, eval_split_size(cfg)))
    ss = eng.generate([r.problem for r in recs], api.SamplingParams(n=1, temperature=0.0, max_new_tokens=128),
                      two_turn=False)
    r1 = [api.reward("arithmetic", s.turn1_text, r) for s, r in zip(ss, recs)]
    yes, no = one_token_ids(tok, ["Yes", "yes", "YES"]), one_token_ids(tok, ["No", "no", "NO"])
    own = yes_no_margins(model, tok, [[{"role": "user", "content": r.problem},
                                       {"role": "assistant", "content": s.turn1_text},
                                       {"role": "user", "content": QUESTION}] for s, r in zip(ss, recs)], yes, no)
    right, wrong = [m for m, x in zip(own, r1) if x == 1], [m for m, x in zip(own, r1) if x == 0]
    ask = lambda e, v: [{"role": "user", "content": f"Is {e} = {v}? Answer yes or no."}]
    true_m = yes_no_margins(model, tok, [ask(expression(r), int(r.answer)) for r in recs], yes, no)
    false_m = yes_no_margins(model, tok, [ask(expression(r), off_by(int(r.answer), expression(r)))
                                          for r in recs], yes, no)
    out = {"n": len(recs), "acc_t1": sum(r1) / len(recs), "cut_t1": sum(s.finish_reasons[0] == "length" for s in ss) / len(ss),
           "own_answer_auc": auc(right, wrong), "own_margin_right": sum(right) / max(1, len(right)),
           "own_margin_wrong": sum(wrong) / max(1, len(wrong)),
           "p_yes_own": sum(m > 0 for m in own) / len(own),
           "true_vs_off_auc": auc(true_m, false_m),
           # the model's confidence in its own turn 1 (greedy rows carry log_softmax(logits)[token]): a signal a
           # turn 2 could in principle read even where the yes/no answer carries none
           **{f"confidence_{k}_auc": auc([f(s.turn1_logprobs) for s, x in zip(ss, r1) if x == 1],
                                         [f(s.turn1_logprobs) for s, x in zip(ss, r1) if x == 0])
              for k, f in (("mean", lambda v: sum(v) / max(1, len(v))), ("min", lambda v: min(v, default=0.0)))},
           "samples": [{"problem": r.problem, "answer": r.answer, "y1": s.turn1_text, "right": x, "margin": round(m, 3)}
                       for s, r, x, m in list(zip(ss, recs, r1, own))[:12]]}
    if orders and overrides.get("n_operands", 2) == 2 and overrides.get("ops", ["+"]) == ["+"]:
        out["orders"] = order_effect(eng, tok, recs)
    return out


def order_effect(eng, tok, recs) -> dict:
    got = {}
    for name, fmt in ORDERS.items():
        pre = [fmt(*map(int, expression(r).split(" + "))) for r in recs]
        ids = [eng.chat.prompt_ids(r.problem) + tok.encode(p, add_special_tokens=False) for r, p in zip(recs, pre)]
        ss = eng.generate_ids(ids, api.SamplingParams(n=1, temperature=0.0, max_new_tokens=16))
        # the first line: the equation's result, not whatever the model writes after it
        got[name] = [api.reward("arithmetic", p + s.turn1_text.split("\n")[0], r) for s, r, p in zip(ss, recs, pre)]
    base = got["question's order"]
    return {name: {"acc": sum(v) / len(v), **({} if name == "question's order" else flips(base, v))}
            for name, v in got.items()}


def explore(eng, n: int, instructions: dict[str, str], temperature: float = 0.7, samples: int = 4) -> dict:
    """How often sampled turns 2 (the preset's sampling: temperature 0.7, 4 a prompt, n training problems) write
    the sum in the other operand order, under each turn-2 instruction: what RL would have to start from to learn
    the re-add-in-another-order check."""
    recs = api.load_records(api.DataConfig(task="arithmetic"), "train", n)
    out = {}
    for name, instr in instructions.items():
        ss = eng.generate([r.problem for r in recs], api.SamplingParams(n=samples, temperature=temperature,
                                                                        max_new_tokens=128, seed=1),
                          instruction=instr)
        r1 = [api.reward("arithmetic", s.turn1_text, recs[i // samples]) for i, s in enumerate(ss)]
        r2 = [api.reward("arithmetic", s.turn2_text, recs[i // samples]) for i, s in enumerate(ss)]
        swapped = []
        for i, s in enumerate(ss):
            a, b = expression(recs[i // samples]).split(" + ")
            if a != b and f"{b} + {a}" in s.turn2_text:
                swapped.append(r2[i])
        out[name] = {"instruction": instr, "samples": len(ss), "other_order": len(swapped),
                     "other_order_right": int(sum(swapped)), "r1": sum(r1) / len(ss), "r2": sum(r2) / len(ss)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default="embedded")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", default="all", choices=["all", "demo"])
    ap.add_argument("--orders", type=int, default=1, help="1: measure the order effect (two-operand additions)")
    ap.add_argument("--explore", type=int, default=64, help="training problems for the sampled-turn-2 count (0: skip)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = api.load_model(args.spec)
    eng = api.Engine(model, tok)
    rec = {"spec": args.spec, "question": QUESTION, "commit": api.commit(), "machine": api.machine(), "tasks": {}}
    for name, ov in itertools.islice(TASKS.items(), None if args.tasks == "all" else 1):
        t0 = time.time()
        rec["tasks"][name] = r = probe_task(model, tok, eng, ov, args.n, bool(args.orders))
        r["seconds"] = round(time.time() - t0, 1)
        print(json.dumps({"task": name, **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                                           if k != "samples"}}), flush=True)
    if args.explore:
        rec["explore"] = explore(eng, args.explore, {
            "default": api.ARITHMETIC_SELF_CORRECT,
            "other order": "Check the answer above by adding the two numbers in the other order. Write the sum, "
                           "then give the final answer."})
        print(json.dumps({"explore": rec["explore"]}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rec, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
