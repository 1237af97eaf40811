"""Self-correction evaluation (the SCoRe paper's metrics) and the `score-eval` command.

Metrics, as fractions of all n (problem, sample) pairs unless said otherwise:
- acc_t1, acc_t2: accuracy of the first and the second attempt;
- delta = acc_t2 - acc_t1; delta_i2c: wrong at turn 1, right at turn 2; delta_c2i: right then wrong.
  delta == delta_i2c - delta_c2i holds exactly. (The paper's definitions.)
- cut_t1, cut_t2: the turn ended on the token limit (finish reason "length").
- turn 1 *stated* an answer: an answer can be read from it (rewards.stated_answer) AND it ended on EOS
  or a stop string. delta_i2c = delta_i2c_stated (a stated wrong answer corrected) + delta_i2c_unstated
  (turn 1 cut off or without an answer; turn 2 answered).
- delta_stated, the headline: over the n_stated pairs whose turn 1 stated an answer,
  (right at turn 2 - right at turn 1) / n_stated, i.e. acc_t2_stated - acc_t1_stated. Finishing an
  answer that turn 1 never wrote does not count. None when n_stated == 0.
- n_i2c_stated_written: of those stated-wrong-then-right pairs, the ones whose turn 1 had already written
  the right number and ended on another (rewards.wrote_answer: "19 + 33 = 52 ... the sum of 19 and 33." reads
  as 33); turn 2 restating 52 is a reading fix, not a corrected computation. delta_stated_new leaves them out:
  (n_i2c_stated - n_i2c_stated_written - n_c2i_stated) / n_stated.
- edit-distance ratio of y1 vs y2: character Levenshtein distance / (len(y1) + len(y2)), in [0, 1]
  (0: identical, 1: nothing in common), reported as a 10-bin histogram.
- self-consistency (inference scaling, paper Fig. 1/7): majority vote over the turn-1 answers of 2K
  parallel samples, against majority vote over the turn-2 answers of K samples each corrected once
  (the same number of generated answers).

    score-eval --model PATH|embedded --task arithmetic [--n-problems N] [--temperature T] [--k K] [--out FILE]
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
import time
from collections import Counter

import numpy as np

from score_train.config import Config
from score_train.prompts import self_correction_instruction, turn1_message
from score_train.rewards import answer_key, reward, stated_answer, wrote_answer
from score_train.rollout.types import SamplingParams

HIST_BINS = 10
# Above this fraction of turn-1 answers ending on the token limit, delta and i->c mostly measure turn 2
# finishing what turn 1 could not (docs/trainer.md, "The 32-token artefact").
CUT_WARN_FRAC = 0.05
STATED_FINISH = ("eos", "stop")  # finish reasons of a turn that ended by itself


# ---------------------------------------------------------------- metrics

def _flags(x, shape, name):
    f = np.asarray(x, dtype=bool)
    if f.shape != shape:
        raise ValueError(f"{name} must have one entry per pair ({shape[0]}), got shape {f.shape}")
    return f


def self_correction_metrics(r1, r2, stated=None, *, cut_t1=None, cut_t2=None, written=None) -> dict:
    """r1, r2: per-(problem, sample) rewards of turn 1 and turn 2 (0/1).
    stated: per pair, whether turn 1 stated an answer (turn1_stated); adds the stated split and delta_stated.
    cut_t1, cut_t2: per pair, whether that turn ended on the token limit; adds their fractions.
    written: per pair, whether turn 1 wrote the right answer somewhere (rewards.wrote_answer); with stated,
    adds n_i2c_stated_written and delta_stated_new."""
    a = np.asarray(r1, dtype=np.float64) > 0.5
    b = np.asarray(r2, dtype=np.float64) > 0.5
    if a.shape != b.shape:
        raise ValueError(f"r1 and r2 must have the same length, got {a.shape} and {b.shape}")
    n = a.size
    if n == 0:
        raise ValueError("no samples to score")
    i2c = int(np.sum(~a & b))
    c2i = int(np.sum(a & ~b))
    out = {"n": n, "acc_t1": float(a.sum()) / n, "acc_t2": float(b.sum()) / n,
           "delta": (int(b.sum()) - int(a.sum())) / n, "delta_i2c": i2c / n, "delta_c2i": c2i / n}
    for key, flags in (("cut_t1", cut_t1), ("cut_t2", cut_t2)):
        if flags is not None:
            c = _flags(flags, a.shape, key)
            out[f"n_{key}"] = int(c.sum())
            out[key] = int(c.sum()) / n
    if stated is not None:
        s = _flags(stated, a.shape, "stated")
        ns = int(s.sum())
        counts = {"n_i2c_stated": int(np.sum(~a & b & s)), "n_i2c_unstated": int(np.sum(~a & b & ~s)),
                  "n_c2i_stated": int(np.sum(a & ~b & s)), "n_c2i_unstated": int(np.sum(a & ~b & ~s))}
        out.update(n_stated=ns, frac_stated=ns / n, **counts,
                   delta_i2c_stated=counts["n_i2c_stated"] / n, delta_i2c_unstated=counts["n_i2c_unstated"] / n,
                   acc_t1_stated=float(a[s].sum()) / ns if ns else None,
                   acc_t2_stated=float(b[s].sum()) / ns if ns else None,
                   delta_stated=(int(b[s].sum()) - int(a[s].sum())) / ns if ns else None)
        if written is not None:
            w = int(np.sum(~a & b & s & _flags(written, a.shape, "written")))
            out.update(n_i2c_stated_written=w,
                       delta_stated_new=(counts["n_i2c_stated"] - w - counts["n_c2i_stated"]) / ns if ns else None)
    return out


def turn1_stated(kind: str, text: str | None, finish_reason: str) -> bool:
    """Whether turn 1 stated an answer: one can be read from it and it ended by itself (EOS or a stop
    string), not on the token limit. A cut-off turn that happens to contain a number has not stated it."""
    return finish_reason in STATED_FINISH and stated_answer(kind, text) is not None


def truncation_warning(metrics: dict) -> str | None:
    """A loud multi-line warning when more than CUT_WARN_FRAC of the turn-1 answers ended on the token
    limit (metrics: self_correction_metrics' dict with cut_t1, or an eval_<tag>.json); else None."""
    cut = metrics.get("cut_t1")
    if cut is None or cut <= CUT_WARN_FRAC:
        return None
    budget = metrics.get("max_new_tokens")
    at = f" of {budget} tokens" if budget else ""
    bar = "!" * 100
    return "\n".join([
        bar,
        f"WARNING: {metrics.get('n_cut_t1')} of {metrics['n']} turn-1 answers ({100 * cut:.1f}%) ended on the token "
        f"limit{at}, more than {100 * CUT_WARN_FRAC:g}%.",
        "WARNING: turn 2 then finishes answers that turn 1 never wrote, and delta and i->c count that as "
        "self-correction",
        "WARNING: (docs/trainer.md, 'The 32-token artefact'). Look at 'delta among stated answers', and raise the "
        "budget:",
        "WARNING:   score-train: --eval.max_new_tokens=N (evaluations) and --rollout.max_new_tokens=N (rollouts)",
        "WARNING:   score-eval:  --max-new-tokens N",
        bar])


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

def _score(samples, records, kind, reward_pool, num_turns: int = 2):
    """-> one list of 0/1 rewards per turn (turns 1..num_turns)."""
    items = []
    for s in samples:
        rec = records[s.prompt_index]
        texts = s.turn_texts
        items += [(kind, texts[t] if t < len(texts) else None, rec) for t in range(num_turns)]
    if reward_pool is not None:
        rs = reward_pool.score(items)
    else:
        rs = [reward(k, t, r) for k, t, r in items]
    return [rs[t::num_turns] for t in range(num_turns)]


def _finish(s, turn: int) -> str | None:
    return s.finish_reasons[turn] if len(s.finish_reasons) > turn else None


def later_turn_metrics(samples, kind, rewards: list) -> dict:
    """Turn k >= 3 against turn k-1, as flat keys: acc_t3, delta_t23, delta_stated_t23 (among the problems
    whose turn 2 stated an answer), n_stated_t2, n_i2c_stated_t23, n_c2i_t23, cut_t3, ..."""
    out = {}
    for k in range(2, len(rewards)):
        a, b = f"t{k}", f"t{k + 1}"  # the earlier and the later turn, 1-based
        m = self_correction_metrics(rewards[k - 1], rewards[k],
                                    [turn1_stated(kind, s.turn_texts[k - 1], _finish(s, k - 1)) for s in samples],
                                    cut_t2=[_finish(s, k) == "length" for s in samples])
        out.update({f"acc_{b}": m["acc_t2"], f"delta_t{k}{k + 1}": m["delta"],
                    f"delta_stated_t{k}{k + 1}": m["delta_stated"], f"n_stated_{a}": m["n_stated"],
                    f"n_i2c_stated_t{k}{k + 1}": m["n_i2c_stated"], f"n_i2c_unstated_t{k}{k + 1}": m["n_i2c_unstated"],
                    f"n_c2i_t{k}{k + 1}": m["n_c2i_stated"] + m["n_c2i_unstated"], f"n_cut_{b}": m["n_cut_t2"],
                    f"cut_{b}": m["cut_t2"]})
    return out


def _summarise(samples, records, kind, rewards: list, max_new_tokens: int) -> dict:
    r1, r2 = rewards[0], rewards[1]
    ratios = [edit_distance_ratio(s.turn1_text or "", s.turn2_text or "") for s in samples]
    m = self_correction_metrics(r1, r2, [turn1_stated(kind, s.turn1_text, _finish(s, 0)) for s in samples],
                                cut_t1=[_finish(s, 0) == "length" for s in samples],
                                cut_t2=[_finish(s, 1) == "length" for s in samples],
                                written=[wrote_answer(kind, s.turn1_text, records[s.prompt_index].answer)
                                         for s in samples])
    m |= later_turn_metrics(samples, kind, rewards)
    return {"metrics": m | {"max_new_tokens": max_new_tokens, "num_turns": len(rewards)},
            "edit_distance": ratio_histogram(ratios),
            "finish_reasons": dict(Counter(f for s in samples for f in s.finish_reasons)),
            "finish_reasons_per_turn": [dict(Counter(_finish(s, t) for s in samples if _finish(s, t)))
                                        for t in range(len(rewards))]}


def _sample_rows(samples, records, kind, rewards: list) -> list[dict]:
    rows = []
    for i, s in enumerate(samples):
        texts = s.turn_texts
        row = {"id": records[s.prompt_index].id, "sample": s.sample_index, "answer": records[s.prompt_index].answer,
               "y1": s.turn1_text, "y2": s.turn2_text, "r1": rewards[0][i], "r2": rewards[1][i],
               "a1": answer_key(kind, s.turn1_text), "a2": answer_key(kind, s.turn2_text),
               "finish": list(s.finish_reasons), "stated": turn1_stated(kind, s.turn1_text, _finish(s, 0)),
               "written": wrote_answer(kind, s.turn1_text, records[s.prompt_index].answer)}
        for t in range(2, len(rewards)):
            row.update({f"y{t + 1}": texts[t], f"r{t + 1}": rewards[t][i], f"a{t + 1}": answer_key(kind, texts[t])})
        rows.append(row)
    return rows


def _generate(rollout, prompts, params: SamplingParams, *, two_turn: bool, instruction: str | None,
              progress, desc: str, num_turns: int = 2, reply_prefix: str = ""):
    """rollout.generate with a token progress bar on stderr (progress=True), or progress(desc, total)
    returning a callable(tokens) and a close() (tests). The engine reports the tokens of every step; other
    rollouts move the bar once, at the end. total is the budget's worst case, so an answer that stops at
    EOS finishes early and the bar jumps to the end."""
    turns_kw = {"num_turns": num_turns} if two_turn and num_turns > 2 else {}
    if two_turn and reply_prefix:  # only when set: a Rollout of another library need not know the keyword
        turns_kw["reply_prefix"] = reply_prefix
    if not progress:
        return rollout.generate(prompts, params, two_turn=two_turn, instruction=instruction, **turns_kw)
    total = len(prompts) * params.n * (num_turns if two_turn else 1) * params.max_new_tokens
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    else:
        bar = progress(desc, total)
    done = [0]

    def step(tokens: int):
        tokens = min(int(tokens), total - done[0])
        if tokens > 0:
            done[0] += tokens
            bar.update(tokens)

    kw = {"progress": step} if "progress" in inspect.signature(rollout.generate).parameters else {}
    try:
        return rollout.generate(prompts, params, two_turn=two_turn, instruction=instruction, **turns_kw, **kw)
    finally:
        step(total - done[0])
        bar.close()


def evaluate(rollout, records, *, temperature: float = 0.7, k: int = 0, greedy: bool = True,
             max_new_tokens: int = 256, style: str = "plain", seed: int = 0, reward_pool=None,
             keep_samples: bool = True, log=None, progress=False, warn: bool = True, num_turns: int = 2,
             instruction: str = "", reply_prefix: str = "") -> dict:
    """Two-turn evaluation of any Rollout on records (all of one kind).

    greedy: one greedy two-turn sample per problem (the paper's headline numbers).
    k > 0: K two-turn samples per problem at `temperature` (self-correction metrics over them) plus K
    more turn-1-only samples, for self-consistency: majority over 2K turn-1 answers vs majority over
    the K turn-2 answers. Self-consistency is skipped for code (no comparable answers).
    progress: a token progress bar per generation on stderr (see _generate).
    warn: print truncation_warning on stderr when it applies (it is kept in result["warnings"] anyway).
    num_turns: attempts in the greedy pass (> 2 needs a rollout whose generate takes num_turns, the engine);
    turn k >= 3 is reported against turn k-1 (later_turn_metrics). The sampled pass stays two-turn.
    instruction: the message after each turn but the last ("" = the task's own).
    reply_prefix: fixed text each reply after the instruction starts with (context, not the turn's text).
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
    if num_turns < 2:
        raise ValueError(f"num_turns must be >= 2, got {num_turns}")
    log = log or (lambda msg: None)
    prompts = [turn1_message(r, style) for r in records]
    instruction = self_correction_instruction(kind, style, instruction)
    out: dict = {"kind": kind, "n_problems": len(records), "style": style, "instruction": instruction,
                 "reply_prefix": reply_prefix, "max_new_tokens": max_new_tokens}

    if greedy:
        t0 = time.perf_counter()
        ss = _generate(rollout, prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens, seed=seed),
                       two_turn=True, instruction=instruction, progress=progress, desc="eval greedy",
                       num_turns=num_turns, reply_prefix=reply_prefix)
        gen_s = time.perf_counter() - t0
        _check(ss, len(records), 1, two_turn=True, num_turns=num_turns)
        rs = _score(ss, records, kind, reward_pool, num_turns)
        out["greedy"] = _summarise(ss, records, kind, rs, max_new_tokens) | {"generate_s": gen_s}
        if keep_samples:
            out["greedy"]["samples"] = _sample_rows(ss, records, kind, rs)
        log(f"greedy: {len(ss)} two-turn samples in {gen_s:.1f}s")

    if k > 0:
        t0 = time.perf_counter()
        p = SamplingParams(n=k, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed + 1)
        ss = _generate(rollout, prompts, p, two_turn=True, instruction=instruction, progress=progress,
                       desc=f"eval T={temperature:g} k={k}", reply_prefix=reply_prefix)
        _check(ss, len(records), k, two_turn=True)
        r1, r2 = _score(ss, records, kind, reward_pool)
        sampled = _summarise(ss, records, kind, [r1, r2], max_new_tokens)
        sampled.update({"temperature": temperature, "k": k})
        if kind != "code":
            sampled["self_consistency"] = _self_consistency(rollout, records, prompts, kind, ss, r1, r2, p,
                                                            reward_pool, progress)
        sampled["generate_s"] = time.perf_counter() - t0
        if keep_samples:
            sampled["samples"] = _sample_rows(ss, records, kind, [r1, r2])
        out["sampled"] = sampled
        log(f"sampled: T={temperature} k={k} in {sampled['generate_s']:.1f}s")
    w = truncation_warning(out["greedy" if greedy else "sampled"]["metrics"])
    out["warnings"] = [w] if w else []
    if w and warn:
        print(w, file=sys.stderr, flush=True)
    return out


def _self_consistency(rollout, records, prompts, kind, ss, r1, r2, p: SamplingParams, reward_pool, progress) -> dict:
    """Majority over 2K turn-1 answers (the two-turn samples' and K more turn-1-only ones, seed + 1) against
    majority over the K turn-2 answers, and majority over the two-turn samples' K turn-1 answers."""
    k = p.n
    extra = _generate(rollout, prompts, SamplingParams(n=k, temperature=p.temperature,
                                                       max_new_tokens=p.max_new_tokens, seed=p.seed + 1),
                      two_turn=False, instruction=None, progress=progress, desc=f"eval turn 1 only k={k}")
    _check(extra, len(records), k, two_turn=False)
    if reward_pool is not None:
        rx = reward_pool.score([(kind, s.turn1_text, records[s.prompt_index]) for s in extra])
    else:
        rx = [reward(kind, s.turn1_text, records[s.prompt_index]) for s in extra]
    par, seq, one_k = [], [], []
    for i in range(len(records)):
        two = [j for j, s in enumerate(ss) if s.prompt_index == i]
        one = [j for j, s in enumerate(extra) if s.prompt_index == i]
        par.append(majority_vote([answer_key(kind, ss[j].turn1_text) for j in two]
                                 + [answer_key(kind, extra[j].turn1_text) for j in one],
                                 [r1[j] for j in two] + [rx[j] for j in one]))
        seq.append(majority_vote([answer_key(kind, ss[j].turn2_text) for j in two], [r2[j] for j in two]))
        one_k.append(majority_vote([answer_key(kind, ss[j].turn1_text) for j in two], [r1[j] for j in two]))
    return {"k": k, "parallel_2k_turn1": float(np.mean(par)), "sequential_k_turn2": float(np.mean(seq)),
            "parallel_k_turn1": float(np.mean(one_k))}


def _check(samples, n_prompts, n, *, two_turn, num_turns: int = 2):
    if len(samples) != n_prompts * n:
        raise RuntimeError(f"rollout returned {len(samples)} samples, expected {n_prompts * n}")
    if two_turn and any(s.turn2_text is None for s in samples):
        raise RuntimeError("rollout returned samples without a second turn")
    if two_turn and any(len(s.turn_texts) < num_turns for s in samples):
        raise RuntimeError(f"rollout returned samples with fewer than {num_turns} turns")


# ---------------------------------------------------------------- the trainer's evaluations

def evaluate_run(rollout, records, cfg: Config, tag: str, step: int, run_dir: str) -> dict:
    """Greedy two-turn evaluation on held-out records (score_train.eval, the same prompts as training);
    writes eval_<tag>.json (metrics, edit-distance ratios) and a sample table. The base model's
    evaluation ('before', or 'base' for a run without steps) warns on stderr when turn 1 is cut too often
    (truncation_warning); the warning is kept in the result's "warning"."""
    max_new = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
    model = getattr(rollout, "model", None)
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    t0 = time.perf_counter()
    with rollout.own_dtype() if hasattr(rollout, "own_dtype") else contextlib.nullcontext():  # fp32 evals
        res = evaluate(rollout, records, max_new_tokens=max_new, style=cfg.rollout.style, seed=cfg.run.seed,
                       progress=bool(cfg.run.progress), warn=False, num_turns=cfg.algo.num_turns,
                       instruction=cfg.rollout.instruction, reply_prefix=cfg.rollout.reply_prefix)
    if model is not None and was_training:
        model.train()
    g = res["greedy"]
    rows = g.get("samples", [])
    out = dict(g["metrics"], tag=tag, step=step, num_problems=len(records), eval_s=time.perf_counter() - t0,
               instruction=res["instruction"], reply_prefix=res["reply_prefix"], edit_distance=g["edit_distance"], finish_reasons=g.get("finish_reasons"),
               finish_reasons_per_turn=g.get("finish_reasons_per_turn"),
               edit_distance_ratios=[round(edit_distance_ratio(r["y1"] or "", r["y2"] or ""), 4) for r in rows])
    w = truncation_warning(out) if tag in ("before", "base") else None
    if w:
        out["warning"] = w
        print(w, file=sys.stderr, flush=True)
    with open(os.path.join(run_dir, f"eval_{tag}.json"), "w") as f:
        json.dump(out, f, indent=1)
    if rows:
        probs = {r.id: r.problem for r in records}
        write_samples(os.path.join(run_dir, f"samples_eval_{tag}.md"),
                      [dict(r, problem=probs.get(r["id"], r["id"])) for r in rows[: cfg.eval.sample_rows]])
        # every row, so that any count above can be audited against the texts it was read from
        with open(os.path.join(run_dir, f"eval_{tag}_rows.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(dict(r, problem=probs.get(r["id"], r["id"]))) + "\n")
    return out


def write_samples(path: str, rows: list[dict]):
    def cell(s):
        return str(s).replace("|", "\\|").replace("\n", " ")[:300]

    # "ended": how each turn ended (eos | stop | length = cut by the token limit)
    with open(path, "w") as f:
        f.write("| problem | y1 | y2 | r1 | r2 | ended |\n|---|---|---|---|---|---|\n")
        f.writelines(f"| {cell(r.get('problem'))} | {cell(r.get('y1'))} | {cell(r.get('y2'))} | "
                    f"{r.get('r1')} | {r.get('r2')} | {'/'.join(r.get('finish') or [])} |\n" for r in rows)


HEADLINE_KEYS = ("delta_stated", "n_stated", "n", "acc_t1_stated", "acc_t2_stated", "n_i2c_stated", "n_c2i_stated",
                 "n_i2c_stated_written", "delta_stated_new", "delta", "cut_t1", "cut_t2", "max_new_tokens")


def headline(evals: list[dict]) -> dict:
    """summary.json's headline: delta among stated answers (and what it rests on) of each evaluation, by tag."""
    return {"metric": "delta_stated: (right at turn 2 - right at turn 1) / n_stated, over the n_stated problems "
                      "whose turn 1 stated an answer (read from it, ended on EOS or a stop string)",
            **{e.get("tag", str(i)): {k: e.get(k) for k in HEADLINE_KEYS} | _later_headline(e)
               for i, e in enumerate(evals)}}


def later_turns(m: dict) -> range:
    """The 1-based turns k >= 3 that a metrics dict reports (later_turn_metrics' keys)."""
    k = 3
    while f"acc_t{k}" in m:
        k += 1
    return range(3, k)


def _later_headline(e: dict) -> dict:
    """A third turn's (and later turns') headline keys, when the evaluation has them."""
    return {key: e.get(key) for k in later_turns(e) for key in (
        f"acc_t{k}", f"delta_t{k - 1}{k}", f"delta_stated_t{k - 1}{k}", f"n_stated_t{k - 1}", f"cut_t{k}")}


def _signed(v) -> str:
    return "n/a" if v is None else f"{100 * v:+.1f}%"


def fmt_eval(e: dict) -> str:
    """One line: the headline (delta among stated answers) first, then the paper's metrics and the
    fractions of turns cut by the token limit."""
    head = ""
    if "n_stated" in e:
        head = f"delta among stated answers {_signed(e.get('delta_stated'))} ({e['n_stated']}/{e['n']} stated"
        if e.get("n_i2c_stated_written"):
            head += (f"; {_signed(e.get('delta_stated_new'))} without the {e['n_i2c_stated_written']} whose turn 1 "
                     f"had written the right number")
        head += ") | "
    keys = [("acc_t1", "Acc@t1"), ("acc_t2", "Acc@t2"), ("delta", "delta"), ("delta_i2c", "i->c"),
            ("delta_c2i", "c->i")]
    body = ", ".join(f"{name} {100 * e[k]:.1f}%" for k, name in keys if k in e)
    if "n_i2c_stated" in e:
        body += f" (i->c: {e['n_i2c_stated']} stated wrong, {e['n_i2c_unstated']} cut off or no answer)"
    if "cut_t1" in e:
        body += f", cut by the limit t1 {100 * e['cut_t1']:.1f}% t2 {100 * e.get('cut_t2', 0):.1f}%"
    for k in later_turns(e):
        body += (f" | turn {k}: Acc@t{k} {100 * e[f'acc_t{k}']:.1f}%, delta(t{k - 1},t{k}) "
                 f"{100 * e[f'delta_t{k - 1}{k}']:+.1f}%, among stated {_signed(e.get(f'delta_stated_t{k - 1}{k}'))}, "
                 f"cut {100 * e.get(f'cut_t{k}', 0):.1f}%")
    return head + body + f" (n={e.get('num_problems')})"


# ---------------------------------------------------------------- report

def format_table(result: dict) -> str:
    rows = []
    if "greedy" in result:
        rows.append(("greedy", result["greedy"]))
    if "sampled" in result:
        s = result["sampled"]
        rows.append((f"T={s['temperature']:g}, k={s['k']}", s))
    head = (f"{'decoding':<16}{'d|stated':>9}{'stated':>8}{'Acc@t1':>8}{'Acc@t2':>8}{'delta':>8}{'i->c':>7}"
            f"{'st':>6}{'cut':>6}{'c->i':>7}{'cut@t1':>8}{'cut@t2':>8}{'edit':>6}")
    lines = [f"task {result.get('task', result['kind'])}, model {result.get('model', '?')}, "
             f"{result['n_problems']} held-out problems, {result.get('max_new_tokens', '?')} tokens a turn",
             "d|stated (the headline): Acc@t2 - Acc@t1 over the problems whose turn 1 stated an answer (answer "
             "read, ended by itself); stated: their number.",
             "i->c = st (stated wrong answer corrected) + cut (turn 1 cut off or without an answer); cut@t: "
             "turns that ended on the token limit. Numbers in %; edit = mean edit-distance ratio.",
             head, "-" * len(head)]
    for name, s in rows:
        m = s["metrics"]
        ds = m.get("delta_stated")
        lines.append(f"{name:<16}{'n/a' if ds is None else f'{100 * ds:+.1f}':>9}{m.get('n_stated', '?'):>8}"
                     f"{100 * m['acc_t1']:8.1f}{100 * m['acc_t2']:8.1f}{100 * m['delta']:+8.1f}"
                     f"{100 * m['delta_i2c']:7.1f}{100 * m.get('delta_i2c_stated', 0):6.1f}"
                     f"{100 * m.get('delta_i2c_unstated', 0):6.1f}{100 * m['delta_c2i']:7.1f}"
                     f"{100 * m.get('cut_t1', 0):8.1f}{100 * m.get('cut_t2', 0):8.1f}{s['edit_distance']['mean']:6.2f}")
    for name, s in rows:
        m = s["metrics"]
        if m.get("n_i2c_stated_written"):
            lines.append(f"{name}: {m['n_i2c_stated_written']} of the {m['n_i2c_stated']} stated answers corrected had "
                         f"the right number written in turn 1 already (it ended on another); without them d|stated "
                         f"is {_signed(m.get('delta_stated_new'))}")
        for k in later_turns(m):
            ds = m.get(f"delta_stated_t{k - 1}{k}")
            lines.append(f"{name}: turn {k} vs turn {k - 1}: Acc@t{k} {100 * m[f'acc_t{k}']:.1f}, delta "
                         f"{100 * m[f'delta_t{k - 1}{k}']:+.1f}, among the {m[f'n_stated_t{k - 1}']} whose turn "
                         f"{k - 1} stated an answer {'n/a' if ds is None else f'{100 * ds:+.1f}'}, "
                         f"cut@t{k} {100 * m.get(f'cut_t{k}', 0):.1f}")
    sc = result.get("sampled", {}).get("self_consistency")
    if sc:
        lines.append(f"self-consistency: majority@{2 * sc['k']} turn-1 {100 * sc['parallel_2k_turn1']:.1f}  |  "
                     f"majority@{sc['k']} turn-2 (each corrected once) {100 * sc['sequential_k_turn2']:.1f}  |  "
                     f"majority@{sc['k']} turn-1 {100 * sc['parallel_k_turn1']:.1f}")
    for name, s in rows:
        h = s["edit_distance"]
        lines.append(f"edit-distance ratio histogram ({name}), bins of {1 / len(h['counts']):.1f} from 0 to 1: "
                     + " ".join(str(c) for c in h["counts"]))
    lines += result.get("warnings") or []
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
                          reward_pool=pool, keep_samples=e.samples, log=log, progress=cfg.run.progress,
                          num_turns=e.num_turns, instruction=cfg.rollout.instruction,
                          reply_prefix=cfg.rollout.reply_prefix)
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
