"""The demo's sweeps (sweeps.yaml): `score-train` runs over seeds, algorithms and levers, each recorded as
records/<name>.json, then one table with the pooled sign test (records/demo_sweep.md).

    python experiments/self-correction/sweep.py recompute_s30x2   # 3 seeds of score: 15 + 5 + 15 + 5, the earlier preset
    python experiments/self-correction/sweep.py recompute_s30     # 3 seeds of score, 30 + 10 steps, not interleaved
    python experiments/self-correction/sweep.py recompute         # 3 seeds x {score, multi-turn-rl}, 20 + 20 steps
    python experiments/self-correction/sweep.py main              # 3 seeds x {score, multi-turn-rl}, before the opening
    python experiments/self-correction/sweep.py alpha             # alpha in {0, 1, 10, 30}, seed 0
    python experiments/self-correction/sweep.py turns             # --algo.num_turns=3, seed 0
    python experiments/self-correction/sweep.py alpha1            # alpha 1 over 3 seeds
    python experiments/self-correction/sweep.py levers            # eleven single levers, seed 0
    python experiments/self-correction/sweep.py table             # re-tabulate the records already written
    python experiments/self-correction/sweep.py main --only demo_score_seed1 --run.threads=1   # one run of a sweep
    python experiments/self-correction/sweep.py one --name demo_try_x --algo.beta2=0.5         # any overrides
    python experiments/self-correction/sweep.py audit --name demo_alpha1_seed0 --out-dir DIR   # re-evaluate a run
    python experiments/self-correction/sweep.py audit --name demo_alpha1_seed0 --step step_000020  # end of Stage I
    python experiments/self-correction/sweep.py export --name demo_bf16_pairsft40_seed0 --to DIR   # its model

Each run is a plain `score-train` subprocess with the preset's settings plus the sweep's overrides, so a record's
wall time is what a user would see (model load and both evaluations included): about 20 minutes a run alone on a
2-core machine, about 40 with two side by side (`--only` each, `--run.threads=1`). Long measurements with records,
never part of the test suite. A run's record keeps its final evaluation (greedy, held-out), the base evaluation,
the truncation counts, the config, and what turn 2 changed (`changes`); the table's headline is delta among stated
answers (turn 1 ended by itself with an answer).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
import time

import score_api as api
import torch
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
RECORDS = os.path.join(HERE, "records")


def expand(run: dict, texts: dict) -> list[tuple[str, list[str]]]:
    """One sweeps.yaml run -> [(name, overrides)]: a grid run once per combination of its values (the first key
    outermost), each {key} of the name and overrides filled in; nested lists (YAML aliases) spliced in."""
    grid = run.get("grid") or {}
    flat = [x for o in run["overrides"] for x in (o if isinstance(o, list) else [o])]
    out = []
    for combo in itertools.product(*grid.values()):
        values = {**texts, **dict(zip(grid, map(str, combo)))}
        out.append((_fill(run["name"], values), [_fill(o, values) for o in flat]))
    return out


def _fill(text: str, values: dict) -> str:
    """Each {key} of text replaced by its value; any other brace is taken as written."""
    for k, v in values.items():
        text = text.replace("{" + k + "}", v)
    return text


def load_sweeps(path: str = os.path.join(HERE, "sweeps.yaml")) -> tuple[dict, dict, tuple]:
    """-> (sweeps {name: [(run name, overrides)]}, texts, the earlier presets' record names)."""
    with open(path) as f:
        data = yaml.safe_load(f)
    texts = data.get("texts") or {}
    sweeps = {name: [r for run in runs for r in expand(run, texts)] for name, runs in data["sweeps"].items()}
    return sweeps, texts, tuple(data.get("earlier") or ())


SWEEPS, TEXTS, EARLIER = load_sweeps()
KEEP_INSTRUCTION = TEXTS["keep_instruction"]


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact binomial test of wins vs losses at p = 1/2 (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def run_one(name: str, overrides: list[str], extra: list[str], out_dir: str) -> dict:
    cmd = [sys.executable, "-m", "score_train", f"--run.name={name}", f"--run.out_dir={out_dir}",
           "--run.progress=false", "--run.export=false", *overrides, *extra]
    print(f"[sweep] {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    proc = subprocess.run(cmd, cwd=api.ROOT)
    wall = time.perf_counter() - t0
    run_dir = os.path.join(out_dir, name)
    rec = {"run": name, "command": "score-train " + " ".join(cmd[3:]), "commit": api.commit(), "machine": api.machine(),
           "load_average_start": load0, "load_average_end": os.getloadavg()[0], "returncode": proc.returncode,
           "wall_s": wall}
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
        with open(os.path.join(run_dir, "config.yaml")) as f:
            rec["config_yaml"] = f.read()
        rec["evals"] = summary["evals"]
        rec["train_metrics"] = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))
                                if line.strip()]
        rec.update(changes(os.path.join(run_dir, "eval_after_rows.jsonl")))
    except (OSError, KeyError, json.JSONDecodeError) as e:
        rec["error"] = f"no summary: {e}"
    with open(os.path.join(RECORDS, f"{name}.json"), "w") as f:
        json.dump(rec, f, indent=1)
    return rec


def changes(rows_path: str) -> dict:
    """What turn 2 did in an evaluation's rows: how often it repeated turn 1 word for word, how often it changed
    the answer of a stated wrong / right turn 1, and the text of every stated correction (wrong -> right) and
    breakage (right -> wrong), each with whether turn 1 had already written the right number (a reading fix,
    not a correction)."""
    with open(rows_path) as f:
        rows = [json.loads(x) for x in f if x.strip()]

    def pick(r1: float, r2: float) -> list[dict]:
        return [{"problem": r["problem"], "y1": r["y1"], "y2": r["y2"], "right_number_in_y1": bool(r.get("written"))}
                for r in rows if r.get("stated") and r["r1"] == r1 and r["r2"] == r2]

    def changed(r1: float) -> str:  # how often turn 2 changed the answer of a stated turn 1 of this reward
        rs = [r for r in rows if r.get("stated") and r["r1"] == r1]
        return f"{sum(r.get('a1') != r.get('a2') for r in rs)} of {len(rs)}"

    same = sum(r["y1"] == r["y2"] for r in rows)
    # a turn 2 that detects errors changes wrong answers more often than right ones; a blind one as often
    return {"verbatim_turn2_copies": f"{same} of {len(rows)} (eval_after rows: y2 == y1)",
            "changed_after_wrong_t1": changed(0.0), "changed_after_right_t1": changed(1.0),
            "stated_corrections": pick(0.0, 1.0), "stated_breakages": pick(1.0, 0.0)}


def run_model(name: str, out_dir: str, step: str = "", rec: dict | None = None):
    """-> (config, model, tokenizer, checkpoint dir): a finished run's model at its last complete checkpoint (or
    `step`): the run's base model with the checkpoint's trained layers (or LoRA adapters) loaded."""
    if rec is None:
        with open(os.path.join(RECORDS, f"{name}.json")) as f:
            rec = json.load(f)
    # the run's directory, from the recorded command (a record may keep an earlier run name)
    flags = dict(x.split("=", 1) for x in rec.get("command", "").split(" --")[1:] if "=" in x)
    run_dir = os.path.join(out_dir, flags.get("run.name", name))
    cfg = api.load_config(os.path.join(run_dir, "config.yaml"))
    model, tok = api.load_model(cfg.model.spec, dtype=torch.float32)
    api.prepare_policy(model, cfg.model)  # what the checkpoint holds (the trained layers, or LoRA adapters)
    ckpts = os.path.join(run_dir, "checkpoints")
    last = os.path.join(ckpts, step) if step else api.checkpoint.latest(ckpts)
    if last is None or not os.path.isdir(last):
        raise FileNotFoundError(f"{name}: no {'checkpoint ' + step if step else 'complete checkpoint'} under {ckpts}")
    api.checkpoint.load(last, model, restore_rng=False)
    return cfg, model, tok, last


def audit_key(step: str = "") -> str:
    return f"audit_{step}" if step else "audit"


def audit(name: str, out_dir: str, step: str = "") -> dict:
    """Re-evaluate a finished run's final checkpoint with today's evaluation (greedy, its own config) and keep
    the result in its record as "audit": the counts added since it ran (n_i2c_stated_written, delta_stated_new),
    whether it reproduces the recorded final evaluation, and the texts of every stated correction and breakage.
    step: another checkpoint of the run instead (e.g. step_000020, the end of Stage I), kept as "audit_<step>"
    (reproduces_recorded_eval is then None: no evaluation of it was recorded)."""
    path = os.path.join(RECORDS, f"{name}.json")
    with open(path) as f:
        rec = json.load(f)
    torch.set_num_threads(1)  # greedy outputs do not depend on it (reproduces_recorded_eval checks)
    cfg, model, tok, last = run_model(name, out_dir, step, rec)
    model.eval()
    recs = api.load_records(cfg.data, "eval", cfg.data.eval_size)
    sampling = dataclasses.replace(cfg.rollout, max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens)
    g = api.evaluate(api.Engine(model, tok), recs, sampling, seed=cfg.run.seed, warn=False,
                     num_turns=cfg.algo.num_turns)["greedy"]
    m, after = g["metrics"], (row(rec) or {}).get("after") or {}
    keys = ("acc_t1", "acc_t2", "n_stated", "n_i2c_stated", "n_c2i_stated")
    probs = {r.id: r.problem for r in recs}
    rec[audit_key(step)] = {
        "commit": api.commit(), "checkpoint": os.path.basename(last), "metrics": m,
        "reproduces_recorded_eval": None if step else all(after.get(k) == m.get(k) for k in keys),
        "stated_i2c_and_c2i_rows": [dict(r, problem=probs.get(r["id"])) for r in g["samples"]
                                    if r["stated"] and r["r1"] != r["r2"]]}
    with open(path, "w") as f:
        json.dump(rec, f, indent=1)
    return rec


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def row(rec: dict) -> dict | None:
    evals = rec.get("evals") or []
    before = next((e for e in evals if e.get("tag") in ("before", "base")), None)
    after = next((e for e in reversed(evals) if e.get("tag") == "after"), None)
    if after is None:
        return None
    audit = (rec.get("audit") or {}).get("metrics") or {}
    return {"run": rec["run"], "before": before, "after": after, "wall_s": rec.get("wall_s"), "audit": audit}


def rows(names: list[str]):
    """(name, row or None) for each name with a record under RECORDS."""
    for name in names:
        path = os.path.join(RECORDS, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                yield name, row(json.load(f))


def table(names: list[str]) -> str:
    lines = ["| run | Acc@t1 | Acc@t2 | delta | delta stated (n stated) | i->c stated | i->c cut/none | c->i | "
             "i->c stated, right number in y1 | cut t1 / t2 | base Acc@t1 / Acc@t2 | wall min |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    pooled = {}
    for name, r in rows(names):
        if r is None:
            lines.append(f"| {name} | (no final evaluation) |||||||||")
            continue
        a, b = r["after"], r["before"] or {}
        c2i = a.get("n_c2i_stated", 0) + a.get("n_c2i_unstated", 0)
        written = 0 if a.get("n_i2c_stated") == 0 else a.get("n_i2c_stated_written",
                                                                 r["audit"].get("n_i2c_stated_written"))
        lines.append(
            f"| {name} | {_pct(a['acc_t1'])} | {_pct(a['acc_t2'])} | {_pct(a['delta'])} | "
            f"{_pct(a.get('delta_stated'))} ({a.get('n_stated', '-')}) | {a.get('n_i2c_stated', '-')} | "
            f"{a.get('n_i2c_unstated', '-')} | {c2i} | {'-' if written is None else written} | "
            f"{_pct(a.get('cut_t1'))} / {_pct(a.get('cut_t2'))} | "
            f"{_pct(b.get('acc_t1'))} / {_pct(b.get('acc_t2'))} | {(r['wall_s'] or 0) / 60:.1f} |")
        algo = name.rsplit("_seed", 1)[0]
        p = pooled.setdefault(algo, [0, 0, 0])
        p[0] += a.get("n_i2c_stated", 0)
        p[1] += c2i
        p[2] = None if p[2] is None or written is None else p[2] + written
    for algo, (w, lo, wr) in pooled.items():
        lines.append(f"\n{algo}: pooled i->c among stated {w} vs c->i {lo}, sign test p = {sign_test_p(w, lo):.2g}")
        if wr:
            lines.append(f"{algo}: without the {wr} whose turn 1 had written the right number: {w - wr} vs {lo}, "
                         f"sign test p = {sign_test_p(w - wr, lo):.2g}")
    lines += turns_table(names)
    return "\n".join(lines)


def turns_table(names: list[str]) -> list[str]:
    """The runs with a third turn: delta(t1,t2) and delta(t2,t3), before and after training."""
    out = []
    for name, r in rows(names):
        if r is None or "acc_t3" not in r["after"]:
            continue
        if not out:
            out = ["", "| run | eval | Acc@t1 | Acc@t2 | Acc@t3 | delta(t1,t2) | stated (n) | delta(t2,t3) | stated (n) | "
                   "cut t1 / t2 / t3 |", "|---|---|---|---|---|---|---|---|---|---|"]
        for tag, e in (("base", r["before"] or {}), ("after", r["after"])):
            if "acc_t3" not in e:
                continue
            out.append(f"| {name} | {tag} | {_pct(e['acc_t1'])} | {_pct(e['acc_t2'])} | {_pct(e['acc_t3'])} | "
                       f"{_pct(e['delta'])} | {_pct(e.get('delta_stated'))} ({e.get('n_stated', '-')}) | "
                       f"{_pct(e['delta_t23'])} | {_pct(e.get('delta_stated_t23'))} ({e.get('n_stated_t2', '-')}) | "
                       f"{_pct(e.get('cut_t1'))} / {_pct(e.get('cut_t2'))} / {_pct(e.get('cut_t3'))} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", choices=[*SWEEPS, "one", "table", "audit", "export"])
    ap.add_argument("--name", default="", help="one: the run's name (its record is records/NAME.json)")
    ap.add_argument("--out-dir", default=os.path.join(api.ROOT, "runs", "sweep"))
    ap.add_argument("--step", default="", help="audit: a checkpoint other than the last (e.g. step_000020)")
    ap.add_argument("--to", default="", help="export: the directory to write the run's model to (a plain HF model)")
    ap.add_argument("--only", default="", help="comma-separated run names of the sweep to run (default: all)")
    args, extra = ap.parse_known_args(argv)
    bad = [x for x in extra if not x.startswith("--")]
    if bad:
        ap.error(f"unexpected arguments {bad}: overrides are --section.key=value")
    if args.sweep == "audit":
        if not args.name:
            ap.error("audit: --name NAME is required (comma-separated for several)")
        for name in args.name.split(","):
            a = audit(name, args.out_dir, args.step)[audit_key(args.step)]
            m = a["metrics"]
            print(f"{name}: reproduces {a['reproduces_recorded_eval']}, stated i->c {m.get('n_i2c_stated')} "
                  f"(right number in y1: {m.get('n_i2c_stated_written')}), c->i {m.get('n_c2i_stated')}, "
                  f"delta stated {m.get('delta_stated')}, without them {m.get('delta_stated_new')}", flush=True)
        return 0
    if args.sweep == "export":  # a finished run's model as the start of another (--model.spec=DIR)
        if not (args.name and args.to):
            ap.error("export: --name NAME and --to DIR are required")
        _, model, tok, _ = run_model(args.name, args.out_dir, args.step)
        model.save_pretrained(args.to, tokenizer=tok)
        print(f"{args.name} -> {args.to}", flush=True)
        return 0
    if args.sweep == "one":
        if not args.name:
            ap.error("one: --name NAME is required")
        run_one(args.name, [], extra, args.out_dir)
        print(table([args.name]))
        return 0
    sweeps = SWEEPS if args.sweep == "table" else {args.sweep: SWEEPS[args.sweep]}
    if args.sweep != "table":
        only = {x for x in args.only.split(",") if x}
        runs = [(n, o) for n, o in SWEEPS[args.sweep] if not only or n in only]
        if only - {n for n, _ in runs}:
            ap.error(f"--only: no run {sorted(only - {n for n, _ in runs})} in sweep {args.sweep}")
        for name, overrides in runs:
            run_one(name, overrides, extra, args.out_dir)
    names = [n for runs in sweeps.values() for n, _ in runs]
    names = list(dict.fromkeys(names))
    text = table(names)
    if args.sweep == "table":
        text += "\n\nEarlier preset (bare prompt, 10 + 10 steps, two runs side by side):\n\n" + table(list(EARLIER))
    print(text)
    with open(os.path.join(RECORDS, "demo_sweep.md"), "w") as f:
        f.write(f"# Demo sweep (experiments/self-correction/sweep.py), commit {api.commit()}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
