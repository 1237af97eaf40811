"""The trainer's evaluations: greedy two-turn evaluation of the policy on held-out records, written into the
run directory (eval_<tag>.json, its rows, a sample table), and summary.json's headline."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from score_train.config import Config
from score_train.eval.evaluate import evaluate
from score_train.eval.format import later_turns
from score_train.eval.metrics import edit_distance_ratio, truncation_warning


def evaluate_run(rollout, records, cfg: Config, tag: str, step: int, run_dir: str) -> dict:
    """Greedy two-turn evaluation on held-out records (score_train.eval, the same prompts as training);
    writes eval_<tag>.json (metrics, edit-distance ratios) and a sample table. The base model's
    evaluation ('before', or 'base' for a run without steps) warns on stderr when turn 1 is cut too often
    (truncation_warning); the warning is kept in the result's "warning"."""
    max_new = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
    model = rollout.model
    was_training = model is not None and model.training
    if model is not None:
        model.eval()
    t0 = time.perf_counter()
    with rollout.own_dtype():  # the model's own dtype, whatever the training rollouts sample in
        res = evaluate(rollout, records, dataclasses.replace(cfg.rollout, max_new_tokens=max_new), seed=cfg.run.seed,
                       progress=bool(cfg.run.progress), warn=False, num_turns=cfg.algo.num_turns)
    if was_training:
        model.train()
    g = res["greedy"]
    rows = g.get("samples", [])
    out = dict(g["metrics"], tag=tag, step=step, split=cfg.eval.split, num_problems=len(records),
               eval_s=time.perf_counter() - t0,
               instruction=res["instruction"], reply_prefix=res["reply_prefix"], edit_distance=g["edit_distance"],
               finish_reasons=g.get("finish_reasons"),
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


def _later_headline(e: dict) -> dict:
    """A third turn's (and later turns') headline keys, when the evaluation has them."""
    return {key: e.get(key) for k in later_turns(e) for key in (
        f"acc_t{k}", f"delta_t{k - 1}{k}", f"delta_stated_t{k - 1}{k}", f"n_stated_t{k - 1}", f"cut_t{k}")}
