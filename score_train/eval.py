"""Self-correction evaluation (the SCoRe paper's metrics) and the `score-eval` command.

Metrics, all as fractions of all (problem, sample) pairs:
- acc_t1, acc_t2: accuracy of the first and the second attempt;
- delta = acc_t2 - acc_t1; delta_i2c: wrong at turn 1, right at turn 2; delta_c2i: right then wrong.
  delta == delta_i2c - delta_c2i holds exactly.
- edit-distance ratio of y1 vs y2: character Levenshtein distance / (len(y1) + len(y2)), in [0, 1]
  (0: identical, 1: nothing in common), reported as a 10-bin histogram.
- self-consistency (inference scaling, paper Fig. 1/7): majority vote over the turn-1 answers of 2K
  parallel samples, against majority vote over the turn-2 answers of K samples each corrected once
  (the same number of generated answers).

    score-eval --model PATH|embedded --task arithmetic [--n-problems N] [--temperature T] [--k K] [--out FILE]
"""
from __future__ import annotations

import json
import sys
import time
from collections import Counter

import numpy as np

from score_train.prompts import self_correction_instruction, turn1_message
from score_train.rewards import answer_key, reward
from score_train.rollout.types import SamplingParams

HIST_BINS = 10


# ---------------------------------------------------------------- metrics

def self_correction_metrics(r1, r2) -> dict:
    """r1, r2: per-(problem, sample) rewards of turn 1 and turn 2 (0/1)."""
    a = np.asarray(r1, dtype=np.float64) > 0.5
    b = np.asarray(r2, dtype=np.float64) > 0.5
    if a.shape != b.shape:
        raise ValueError(f"r1 and r2 must have the same length, got {a.shape} and {b.shape}")
    n = a.size
    if n == 0:
        raise ValueError("no samples to score")
    i2c = int(np.sum(~a & b))
    c2i = int(np.sum(a & ~b))
    return {"n": n, "acc_t1": float(a.sum()) / n, "acc_t2": float(b.sum()) / n,
            "delta": (int(b.sum()) - int(a.sum())) / n, "delta_i2c": i2c / n, "delta_c2i": c2i / n}


def levenshtein(a, b) -> int:
    """Edit distance (insert, delete, substitute; cost 1) between two sequences (str or token lists).
    Row by row in numpy: the insertion chain of a row is a running minimum of (cost - column)."""
    if len(a) < len(b):
        a, b = b, a
    if len(b) == 0:
        return len(a)
    if isinstance(a, str):
        xa = np.frombuffer(a.encode("utf-32-le"), dtype=np.uint32)
        xb = np.frombuffer(b.encode("utf-32-le"), dtype=np.uint32)
    else:
        xa, xb = np.asarray(a), np.asarray(b)
    cols = np.arange(len(xb) + 1, dtype=np.int64)
    prev = cols.copy()
    for i, ca in enumerate(xa, 1):
        cur = np.empty_like(prev)
        cur[0] = i
        # substitution / match from the diagonal, deletion from above
        cur[1:] = np.minimum(prev[:-1] + (xb != ca), prev[1:] + 1)
        # insertion: cur[j] = min_{j' <= j} cur[j'] + (j - j')
        cur = np.minimum.accumulate(cur - cols) + cols
        prev = cur
    return int(prev[-1])


def edit_distance_ratio(y1: str, y2: str) -> float:
    total = len(y1) + len(y2)
    return levenshtein(y1, y2) / total if total else 0.0


def ratio_histogram(ratios, bins: int = HIST_BINS) -> dict:
    counts, edges = np.histogram(np.clip(np.asarray(ratios, dtype=np.float64), 0, 1), bins=bins, range=(0.0, 1.0))
    r = np.asarray(ratios, dtype=np.float64)
    return {"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in counts],
            "mean": float(r.mean()) if r.size else 0.0, "median": float(np.median(r)) if r.size else 0.0,
            "frac_identical": float(np.mean(r == 0)) if r.size else 0.0}


def majority_vote(keys, rewards) -> float:
    """Reward of the most frequent answer (ties: the one seen first); samples without an answer do not vote."""
    votes = Counter(k for k in keys if k is not None)
    if not votes:
        return 0.0
    best = max(votes.values())
    for k, r in zip(keys, rewards):
        if k is not None and votes[k] == best:
            return float(r)
    return 0.0  # pragma: no cover


# ---------------------------------------------------------------- evaluation

def _score(samples, records, kind, reward_pool):
    items = []
    for s in samples:
        rec = records[s.prompt_index]
        items.append((kind, s.turn1_text, rec))
        items.append((kind, s.turn2_text, rec))
    if reward_pool is not None:
        rs = reward_pool.score(items)
    else:
        rs = [reward(k, t, r) for k, t, r in items]
    return rs[0::2], rs[1::2]


def _summarise(samples, records, kind, r1, r2) -> dict:
    ratios = [edit_distance_ratio(s.turn1_text or "", s.turn2_text or "") for s in samples]
    return {"metrics": self_correction_metrics(r1, r2), "edit_distance": ratio_histogram(ratios),
            "finish_reasons": dict(Counter(f for s in samples for f in s.finish_reasons))}


def _sample_rows(samples, records, kind, r1, r2) -> list[dict]:
    return [{"id": records[s.prompt_index].id, "sample": s.sample_index, "answer": records[s.prompt_index].answer,
             "y1": s.turn1_text, "y2": s.turn2_text, "r1": r1[i], "r2": r2[i],
             "a1": answer_key(kind, s.turn1_text), "a2": answer_key(kind, s.turn2_text)}
            for i, s in enumerate(samples)]


def evaluate(rollout, records, *, temperature: float = 0.7, k: int = 0, greedy: bool = True,
             max_new_tokens: int = 256, style: str = "plain", seed: int = 0, reward_pool=None,
             keep_samples: bool = True, log=None) -> dict:
    """Two-turn evaluation of any Rollout on records (all of one kind).

    greedy: one greedy two-turn sample per problem (the paper's headline numbers).
    k > 0: K two-turn samples per problem at `temperature` (self-correction metrics over them) plus K
    more turn-1-only samples, for self-consistency: majority over 2K turn-1 answers vs majority over
    the K turn-2 answers. Self-consistency is skipped for code (no comparable answers).
    """
    if not records:
        raise ValueError("records is empty")
    kinds = {r.kind for r in records}
    if len(kinds) != 1:
        raise ValueError(f"records must all be of one kind, got {sorted(kinds)}")
    kind = kinds.pop()
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if not greedy and k == 0:
        raise ValueError("nothing to evaluate: greedy=False and k=0")
    log = log or (lambda msg: None)
    prompts = [turn1_message(r, style) for r in records]
    instruction = self_correction_instruction(kind, style)
    out: dict = {"kind": kind, "n_problems": len(records), "style": style, "instruction": instruction,
                 "max_new_tokens": max_new_tokens}

    if greedy:
        t0 = time.perf_counter()
        ss = rollout.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens, seed=seed),
                              two_turn=True, instruction=instruction)
        gen_s = time.perf_counter() - t0
        _check(ss, len(records), 1, two_turn=True)
        r1, r2 = _score(ss, records, kind, reward_pool)
        out["greedy"] = _summarise(ss, records, kind, r1, r2) | {"generate_s": gen_s}
        if keep_samples:
            out["greedy"]["samples"] = _sample_rows(ss, records, kind, r1, r2)
        log(f"greedy: {len(ss)} two-turn samples in {gen_s:.1f}s")

    if k > 0:
        t0 = time.perf_counter()
        p = SamplingParams(n=k, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed + 1)
        ss = rollout.generate(prompts, p, two_turn=True, instruction=instruction)
        _check(ss, len(records), k, two_turn=True)
        r1, r2 = _score(ss, records, kind, reward_pool)
        sampled = _summarise(ss, records, kind, r1, r2)
        sampled.update({"temperature": temperature, "k": k})
        if kind != "code":
            extra = rollout.generate(prompts, SamplingParams(n=k, temperature=temperature,
                                                             max_new_tokens=max_new_tokens, seed=seed + 2),
                                     two_turn=False)
            _check(extra, len(records), k, two_turn=False)
            if reward_pool is not None:
                rx = reward_pool.score([(kind, s.turn1_text, records[s.prompt_index]) for s in extra])
            else:
                rx = [reward(kind, s.turn1_text, records[s.prompt_index]) for s in extra]
            par, seq = [], []
            for i in range(len(records)):
                two = [j for j, s in enumerate(ss) if s.prompt_index == i]
                one = [j for j, s in enumerate(extra) if s.prompt_index == i]
                par.append(majority_vote([answer_key(kind, ss[j].turn1_text) for j in two]
                                         + [answer_key(kind, extra[j].turn1_text) for j in one],
                                         [r1[j] for j in two] + [rx[j] for j in one]))
                seq.append(majority_vote([answer_key(kind, ss[j].turn2_text) for j in two], [r2[j] for j in two]))
            sampled["self_consistency"] = {
                "k": k, "parallel_2k_turn1": float(np.mean(par)), "sequential_k_turn2": float(np.mean(seq)),
                "parallel_k_turn1": float(np.mean([majority_vote(
                    [answer_key(kind, ss[j].turn1_text) for j, s in enumerate(ss) if s.prompt_index == i],
                    [r1[j] for j, s in enumerate(ss) if s.prompt_index == i]) for i in range(len(records))]))}
        sampled["generate_s"] = time.perf_counter() - t0
        if keep_samples:
            sampled["samples"] = _sample_rows(ss, records, kind, r1, r2)
        out["sampled"] = sampled
        log(f"sampled: T={temperature} k={k} in {sampled['generate_s']:.1f}s")
    return out


def _check(samples, n_prompts, n, *, two_turn):
    if len(samples) != n_prompts * n:
        raise RuntimeError(f"rollout returned {len(samples)} samples, expected {n_prompts * n}")
    if two_turn and any(s.turn2_text is None for s in samples):
        raise RuntimeError("rollout returned samples without a second turn")


# ---------------------------------------------------------------- report

def format_table(result: dict) -> str:
    rows = []
    if "greedy" in result:
        rows.append(("greedy", result["greedy"]))
    if "sampled" in result:
        s = result["sampled"]
        rows.append((f"T={s['temperature']:g}, k={s['k']}", s))
    head = f"{'decoding':<16}{'Acc@t1':>8}{'Acc@t2':>8}{'delta':>8}{'i->c':>8}{'c->i':>8}{'edit':>7}"
    lines = [f"task {result.get('task', result['kind'])}, model {result.get('model', '?')}, "
             f"{result['n_problems']} held-out problems (numbers in %; edit = mean edit-distance ratio)",
             head, "-" * len(head)]
    for name, s in rows:
        m = s["metrics"]
        lines.append(f"{name:<16}{100 * m['acc_t1']:8.1f}{100 * m['acc_t2']:8.1f}{100 * m['delta']:+8.1f}"
                     f"{100 * m['delta_i2c']:8.1f}{100 * m['delta_c2i']:8.1f}{s['edit_distance']['mean']:7.2f}")
    sc = result.get("sampled", {}).get("self_consistency")
    if sc:
        lines.append(f"self-consistency: majority@{2 * sc['k']} turn-1 {100 * sc['parallel_2k_turn1']:.1f}  |  "
                     f"majority@{sc['k']} turn-2 (each corrected once) {100 * sc['sequential_k_turn2']:.1f}  |  "
                     f"majority@{sc['k']} turn-1 {100 * sc['parallel_k_turn1']:.1f}")
    for name, s in rows:
        h = s["edit_distance"]
        lines.append(f"edit-distance ratio histogram ({name}), bins of {1 / len(h['counts']):.1f} from 0 to 1: "
                     + " ".join(str(c) for c in h["counts"]))
    return "\n".join(lines)


# ---------------------------------------------------------------- model loading

def make_rollout(model: str, *, backend: str = "auto", dtype: str = "float32", device: str = "cpu",
                 max_batch: int = 16):
    """A Rollout for `model` (a local HF directory, a .gguf file, or "embedded").

    backend "auto": the paged engine (score_train.rollout.engine) when it is importable, otherwise
    the HF `generate` baseline (score_train.rollout.hf_baseline).
    """
    import importlib.util

    import torch

    tdtype = getattr(torch, dtype)
    have = lambda m: importlib.util.find_spec(m) is not None  # noqa: E731
    if backend == "auto":
        backend = "engine" if have("score_train.rollout.engine") else "hf"
    if backend not in ("engine", "hf"):
        raise ValueError(f"backend must be auto, engine or hf, got {backend!r}")
    from score_train.model import load_model

    m, tok = load_model(model, dtype=tdtype, device=device)
    if backend == "engine":
        from score_train.rollout.engine import Engine

        return Engine(m, tok), backend
    from score_train.rollout.hf_baseline import HFRollout

    return HFRollout(m, tok, batch_size=max_batch), backend


# ---------------------------------------------------------------- CLI

def run_command(cfg, records) -> int:
    """score-eval on checked inputs (score_train.cli parses the command line and reads `records` first):
    cfg is a resolved `config.EvalCommandConfig`."""
    kind = records[0].kind
    device = cfg.run.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.run.threads > 0:
        import torch

        torch.set_num_threads(cfg.run.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    e = cfg.evaluate
    k = e.k
    if k < 0:
        k = 4 if device.startswith("cuda") else 0
        if k == 0:
            log("CPU: greedy only (pass --k K for sampled metrics and self-consistency)")
    t0 = time.perf_counter()
    rollout, backend = make_rollout(cfg.model.spec, backend=cfg.rollout.engine, dtype=cfg.model.dtype,
                                    device=device)
    log(f"loaded {cfg.model.spec} ({backend} backend, {device}) in {time.perf_counter() - t0:.1f}s; "
        f"{len(records)} problems, {cfg.rollout.max_new_tokens} new tokens per turn, k={k}")
    pool = None
    if kind == "code":
        from score_train.rewards import RewardPool

        pool = RewardPool()
    try:
        result = evaluate(rollout, records, temperature=cfg.rollout.temperature, k=k, greedy=e.greedy,
                          max_new_tokens=cfg.rollout.max_new_tokens, style=cfg.rollout.style, seed=cfg.run.seed,
                          reward_pool=pool, keep_samples=e.samples, log=log)
    finally:
        if pool is not None:
            pool.close()
    task, d = cfg.data.task, cfg.data
    arith = ({"arithmetic": {"digits": d.digits, "n_operands": d.n_operands, "ops": list(d.ops),
                             "prompt_format": d.prompt_format}} if task == "arithmetic" else {})
    result = {"model": cfg.model.spec, "task": task, "split": e.split, "backend": backend, "device": device,
              "seed": cfg.run.seed, "max_new_tokens": cfg.rollout.max_new_tokens, **arith, **result,
              "config": cfg.to_dict()}  # the resolved settings, budgets filled in
    print(format_table(result))
    out = e.out or f"score-eval-{task.replace(':', '_').replace('/', '_')}.json"
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    """score-eval (the console entry point is score_train.cli.eval_main)."""
    from score_train.cli import eval_main

    return eval_main(argv)


if __name__ == "__main__":
    sys.exit(main())
