"""Two-turn evaluation of any `Rollout` on a task's records: greedy (the headline) and sampled with
self-consistency, scored by the task's reward, summarised by `score_train.eval.metrics`."""
from __future__ import annotations

import sys
import time
from collections import Counter

import numpy as np
from tqdm.auto import tqdm

from score_train.config import TASK_DEFAULTS, SamplingConfig
from score_train.eval.metrics import (
    edit_distance_ratio,
    majority_vote,
    ratio_histogram,
    self_correction_metrics,
    truncation_warning,
    turn1_stated,
)
from score_train.prompts import self_correction_instruction, turn1_message
from score_train.rewards import answer_key, reward, wrote_answer
from score_train.rollout.types import SamplingParams


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
    returning a callable(tokens) and a close() (tests). The engine reports the tokens of every step, the HF
    baseline those of each turn. total is the budget's worst case, so an answer that stops at EOS finishes early
    and the bar jumps to the end."""
    turns = num_turns if two_turn else 1
    if not progress:
        return rollout.generate(prompts, params, two_turn=two_turn, instruction=instruction, num_turns=turns,
                                reply_prefix=reply_prefix)
    total = len(prompts) * params.n * turns * params.max_new_tokens
    bar = (tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
           if progress is True else progress(desc, total))
    done = [0]

    def step(tokens: int):
        tokens = min(int(tokens), total - done[0])
        if tokens > 0:
            done[0] += tokens
            bar.update(tokens)

    try:
        return rollout.generate(prompts, params, two_turn=two_turn, instruction=instruction, num_turns=turns,
                                reply_prefix=reply_prefix, progress=step)
    finally:
        step(total - done[0])
        bar.close()


def evaluate(rollout, records, sampling: SamplingConfig | None = None, *, k: int = 0, greedy: bool = True,
             seed: int = 0, reward_pool=None, keep_samples: bool = True, log=None, progress=False, warn: bool = True,
             num_turns: int = 2) -> dict:
    """Two-turn evaluation of any Rollout on records (all of one kind).

    sampling: the prompts, turn-2 text, budget and temperature (`SamplingConfig`, its defaults when None; a
    max_new_tokens of 0 is the task's default).
    greedy: one greedy two-turn sample per problem (the paper's headline numbers).
    k > 0: K two-turn samples per problem at sampling.temperature (self-correction metrics over them) plus K
    more turn-1-only samples, for self-consistency: majority over 2K turn-1 answers vs majority over
    the K turn-2 answers. Self-consistency is skipped for code (no comparable answers).
    progress: a token progress bar per generation on stderr (see _generate).
    warn: print truncation_warning on stderr when it applies (it is kept in result["warnings"] anyway).
    num_turns: attempts in the greedy pass (> 2 needs a rollout whose generate takes num_turns, the engine);
    turn k >= 3 is reported against turn k-1 (later_turn_metrics). The sampled pass stays two-turn.
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
    sp = sampling or SamplingConfig()
    style, reply_prefix, temperature = sp.style, sp.reply_prefix, sp.temperature
    max_new_tokens = sp.max_new_tokens or TASK_DEFAULTS[kind]["max_new_tokens"]
    prompts = [turn1_message(r, style) for r in records]
    instruction = self_correction_instruction(kind, style, sp.instruction)
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
