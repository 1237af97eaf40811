"""The SCoRe paper's self-correction metrics, and the counts that keep them honest.

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

"""
from __future__ import annotations

from collections import Counter

import numpy as np

from score_train.rewards import stated_answer

HIST_BINS = 10
# Above this fraction of turn-1 answers ending on the token limit, delta and i->c mostly measure turn 2
# finishing what turn 1 could not (experiments/self-correction/REPORT.md, "The 32-token artefact").
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
        "WARNING: (experiments/self-correction/REPORT.md, 'The 32-token artefact'). Look at 'delta among stated "
        "answers', and raise the budget:",
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
