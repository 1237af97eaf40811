"""The evidence protocol (evidence.yaml): the demo's training runs with a dev split, each model evaluated once on the
whole eval split under its training text, and on problems and instructions it never trained on.

    python experiments/self-correction/evidence.py run [--only JOB,...]   # the jobs, one subprocess each
    python experiments/self-correction/evidence.py jobs                   # list them (train:RUN, eval:MODEL:VARIANT)
    python experiments/self-correction/evidence.py collect                # runs/evidence -> records/evidence_*.json
    python experiments/self-correction/evidence.py table                  # records -> records/evidence.md

A job is a plain `score-train` or `score-eval` subprocess, so a record's wall time is a user's. Long measurements
with records, never part of the test suite; about 25 minutes a training run and 5-9 an evaluation at one thread,
two side by side on 2 cores (`run --only` in two shells).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import score_api as api
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
RECORDS = os.path.join(HERE, "records")
with open(os.path.join(HERE, "evidence.yaml")) as f:
    P = yaml.safe_load(f)
OUT = os.path.join(api.ROOT, "runs", "evidence")
TEXT = [f"--instruction={P['text']['instruction']}", f"--reply-prefix={P['text']['reply_prefix']}"]


def train_cmd(run: dict) -> list[str]:
    return [sys.executable, "-m", "score_train", f"--run.name={run['name']}", *P["train"], f"--run.seed={run['seed']}",
            f"--algo.name={run['algo']}", f"--rollout.instruction={P['text']['instruction']}",
            f"--rollout.reply_prefix={P['text']['reply_prefix']}"]


def eval_cmd(model: str, variant: str) -> list[str]:
    spec = model if model == "embedded" else os.path.join(OUT, model, "final_model")
    args = [x for a in P["variants"][variant]["args"] for x in (TEXT if a == "{text}" else [a])]
    return [sys.executable, "-m", "score_train.commands.eval", f"--model={spec}", "--data.dev_fraction=0.1",
            "--run.threads=1", "--run.progress=false", *args, f"--out={eval_out(model, variant)}"]


def eval_out(model: str, variant: str) -> str:
    return os.path.join(OUT, f"eval_{model}_{variant}.json")


def jobs() -> dict[str, list[str]]:
    out = {f"train:{r['name']}": train_cmd(r) for r in P["runs"]}
    out.update({f"eval:{m}:{v}": eval_cmd(m, v) for v in P["variants"] for m in P["models"]})
    return out


def run(names: list[str]) -> None:
    os.makedirs(os.path.join(OUT, "logs"), exist_ok=True)
    for name in names:
        cmd = jobs()[name]
        print(f"[evidence] {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        with open(os.path.join(OUT, "logs", name.replace(":", "_") + ".log"), "w") as log:
            rc = subprocess.run(cmd, cwd=api.ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
        with open(os.path.join(OUT, "logs", "wall.jsonl"), "a") as f:
            f.write(json.dumps({"job": name, "returncode": rc, "wall_s": time.perf_counter() - t0}) + "\n")


def _shown(cmd: list[str]) -> str:
    head = "score-train" if cmd[2] == "score_train" else "score-eval"
    return " ".join([head, *cmd[3:]]).replace(OUT, "runs/evidence")


def collect() -> list[str]:
    """records/evidence_<run>.json (the run: config, its dev evaluation, metrics, what turn 2 changed) and
    records/evidence_eval_<model>_<variant>.json (the evaluation's metrics and every stated correction / breakage)."""
    from sweep import changes
    written = []
    for r in P["runs"]:
        d = os.path.join(OUT, r["name"])
        if not os.path.exists(os.path.join(d, "summary.json")):
            continue
        with open(os.path.join(d, "summary.json")) as f:
            summary = json.load(f)
        with open(os.path.join(d, "config.yaml")) as f:
            cfg = f.read()
        rec = {"run": r["name"], "command": _shown(train_cmd(r)), "commit": api.commit(), "machine": api.machine(),
               "wall_s": summary.get("wall_s"), "config_yaml": cfg, "evals": summary["evals"],
               "train_metrics": [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl")) if x.strip()],
               **changes(os.path.join(d, "eval_after_rows.jsonl"))}
        written.append(_write(f"evidence_{r['name']}", rec))
    for v in P["variants"]:
        for m in P["models"]:
            path = eval_out(m, v)
            if not os.path.exists(path):
                continue
            with open(path) as f:
                res = json.load(f)
            g = res["greedy"]
            rows = g.pop("samples", [])
            rec = {"model": m, "variant": v, "command": _shown(eval_cmd(m, v)), "commit": api.commit(),
                   "machine": api.machine(), "split": res["split"], "n_problems": res["n_problems"],
                   "instruction": res["instruction"], "reply_prefix": res["reply_prefix"],
                   "arithmetic": res.get("arithmetic"), "metrics": g["metrics"], "generate_s": g.get("generate_s"),
                   "finish_reasons_per_turn": g.get("finish_reasons_per_turn"),
                   "stated_changes": [r for r in rows if r.get("stated") and r["r1"] != r["r2"]]}
            written.append(_write(f"evidence_eval_{m}_{v}", rec))
    return written


def _write(name: str, rec: dict) -> str:
    path = os.path.join(RECORDS, f"{name}.json")
    with open(path, "w") as f:
        json.dump(rec, f, indent=1)
    return path


def _load(name: str) -> dict | None:
    path = os.path.join(RECORDS, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:+.1f}" if x < 0 or x > 0 else "0.0"


def _acc(x) -> str:
    return f"{100 * x:.1f}"


def table() -> str:
    lines = ["# Evidence (experiments/self-correction/evidence.py), greedy, 128 tokens a turn", "",
             "## Dev split (512 of 833 problems): the training runs' own evaluation", "",
             "| run | Acc@t1 | Acc@t2 | delta among stated (n) | i->c / c->i stated | cut t1 |", "|---|---|---|---|---|---|"]
    for r in P["runs"]:
        rec = _load(f"evidence_{r['name']}")
        if rec is None:
            lines.append(f"| {r['name']} | not run |||||")
            continue
        a = next(e for e in rec["evals"] if e["tag"] == "after")
        lines.append(f"| {r['name']} | {_acc(a['acc_t1'])} | {_acc(a['acc_t2'])} | {_pct(a['delta_stated'])} "
                     f"({a['n_stated']}) | {a['n_i2c_stated']} / {a['n_c2i_stated']} | {_acc(a['cut_t1'])}% |")
    for v, spec in P["variants"].items():
        base = _load(f"evidence_eval_embedded_{v}")
        lines += ["", f"## {v}: {' '.join(spec['args'])}", "",
                  "| model | Acc@t1 | Acc@t2 | delta among stated (n) | trained minus base | i->c / c->i stated | "
                  "cut t1 / t2 |", "|---|---|---|---|---|---|---|"]
        for m in P["models"]:
            rec = _load(f"evidence_eval_{m}_{v}")
            if rec is None:
                lines.append(f"| {m} | not measured ||||||")
                continue
            x = rec["metrics"]
            minus = "" if base is None or m == "embedded" else _pct(x["delta_stated"] - base["metrics"]["delta_stated"])
            lines.append(f"| {m} | {_acc(x['acc_t1'])} | {_acc(x['acc_t2'])} | {_pct(x['delta_stated'])} "
                         f"({x['n_stated']} of {x['n']}) | {minus} | {x['n_i2c_stated']} / {x['n_c2i_stated']} | "
                         f"{_acc(x['cut_t1'])}% / {_acc(x['cut_t2'])}% |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["run", "jobs", "collect", "table"])
    ap.add_argument("--only", default="", help="run: comma-separated job names (default: all, in order)")
    args = ap.parse_args(argv)
    if args.what == "jobs":
        for name, cmd in jobs().items():
            print(f"{name}\t{_shown(cmd)}")
    elif args.what == "run":
        names = [x for x in args.only.split(",") if x] or list(jobs())
        unknown = set(names) - set(jobs())
        if unknown:
            ap.error(f"--only: no job {sorted(unknown)} (evidence.py jobs lists them)")
        run(names)
    elif args.what == "collect":
        print("\n".join(collect()))
    else:
        text = table()
        with open(os.path.join(RECORDS, "evidence.md"), "w") as f:
            f.write(text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
