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
            f"--rollout.reply_prefix={P['text']['reply_prefix']}", *run.get("args", [])]


def eval_cmd(model: str, variant: str) -> list[str]:
    spec = model if model == "embedded" else os.path.join(OUT, model, "final_model")
    args = [x for a in P["variants"][variant]["args"] for x in (TEXT if a == "{text}" else [a])]
    return [sys.executable, "-m", "score_train.commands.eval", f"--model={spec}", "--data.dev_fraction=0.1",
            "--run.threads=1", "--run.progress=false", *args, f"--out={eval_out(model, variant)}"]


def eval_out(model: str, variant: str) -> str:
    return os.path.join(OUT, f"eval_{model}_{variant}.json")


def jobs() -> dict[str, list[str]]:
    out = {f"train:{r['name']}": train_cmd(r) for r in P["runs"]}
    out.update({f"eval:{m}:{v}": eval_cmd(m, v) for v in P["variants"] for m in models(v)})
    return out


def models(variant: str) -> list[str]:
    return P["variants"][variant].get("models", P["models"])


def run(names: list[str]) -> None:
    os.makedirs(os.path.join(OUT, "logs"), exist_ok=True)
    for name in names:
        cmd = jobs()[name]
        print(f"[evidence] {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        t0, at = time.perf_counter(), api.commit()  # the code the job runs is the checkout's when it starts
        with open(os.path.join(OUT, "logs", name.replace(":", "_") + ".log"), "w") as log:
            rc = subprocess.run(cmd, cwd=api.ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
        with open(os.path.join(OUT, "logs", "wall.jsonl"), "a") as f:
            f.write(json.dumps({"job": name, "returncode": rc, "wall_s": time.perf_counter() - t0,
                                "commit": at, "machine": api.machine()}) + "\n")


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
        rec = {"run": r["name"], "command": _shown(train_cmd(r)),
               **ran_at(f"train:{r['name']}", f"evidence_{r['name']}"),
               "wall_s": summary.get("wall_s"), "model_digest": digest(os.path.join(d, "final_model")),
               "config_yaml": cfg, "evals": summary["evals"],
               "train_metrics": [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl")) if x.strip()],
               **changes(os.path.join(d, "eval_after_rows.jsonl"))}
        name, old = record_name(r["name"], rec), _load(f"evidence_{r['name']}")
        if name == f"evidence_{r['name']}" and old and old.get("model_digest") != rec["model_digest"]:
            # the same figures from another run: the record keeps the first run and lists the reproductions
            seen = [x for x in old.get("reproduced", []) if x["model_digest"] != rec["model_digest"]]
            rec = dict(old, reproduced=seen + [{k: rec[k] for k in ("commit", "machine", "wall_s", "model_digest")}])
        written.append(_write(name, rec))
    for v in P["variants"]:
        for m in models(v):
            path = eval_out(m, v)
            if not os.path.exists(path):
                continue
            with open(path) as f:
                res = json.load(f)
            g = res["greedy"]
            rows = g.pop("samples", [])
            spec = None if m == "embedded" else os.path.join(OUT, m, "final_model")
            rec = {"model": m, "variant": v, "command": _shown(eval_cmd(m, v)),
                   "model_digest": None if spec is None else digest(spec),
                   **ran_at(f"eval:{m}:{v}", f"evidence_eval_{m}_{v}"), "split": res["split"],
                   "n_problems": res["n_problems"],
                   "instruction": res["instruction"], "reply_prefix": res["reply_prefix"],
                   "arithmetic": res.get("arithmetic"), "metrics": g["metrics"], "generate_s": g.get("generate_s"),
                   "finish_reasons_per_turn": g.get("finish_reasons_per_turn"),
                   "stated_changes": [r for r in rows if r.get("stated") and r["r1"] != r["r2"]]}
            written.append(_write(f"evidence_eval_{m}_{v}", rec))
    return written


def digest(model_dir: str) -> str | None:
    """The first 12 hex digits of the sha256 of a model's weight files: which build of a run an evaluation read."""
    import hashlib
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors")) if os.path.isdir(model_dir) else []
    if not files:
        return None
    h = hashlib.sha256()
    for name in files:
        with open(os.path.join(model_dir, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:12]


def record_name(run: str, rec: dict) -> str:
    """A training record that choices were made on is never replaced by a rerun that trained another model (float
    rounding differs between CPUs): a rerun whose dev evaluation differs (timings aside) is written beside it as
    <run>_rerun; one that reproduces them is listed in the record's "reproduced"."""
    old = _load(f"evidence_{run}")
    if old is None or old.get("model_digest") == rec["model_digest"]:
        return f"evidence_{run}"
    return f"evidence_{run}" if _untimed(old["evals"]) == _untimed(rec["evals"]) else f"evidence_{run}_rerun"


def _untimed(evals: list[dict]) -> list[dict]:
    """An evaluation's figures without its timings (keys ending in _s), which differ between any two runs."""
    return [{k: v for k, v in e.items() if not k.endswith("_s")} for e in evals]


def ran_at(job: str, record: str) -> dict:
    """The commit and machine a job ran at: its line in logs/wall.jsonl, else the record's own (a job run before
    the log kept them), else now."""
    path, got = os.path.join(OUT, "logs", "wall.jsonl"), None
    if os.path.exists(path):
        for line in open(path):
            x = json.loads(line)
            if x["job"] == job and "commit" in x:
                got = {"commit": x["commit"], "machine": x["machine"]}
    old = _load(record) or {}
    return got or {k: old.get(k) or getattr(api, k)() for k in ("commit", "machine")}


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
    return "-" if x is None else "0.0" if round(100 * x, 1) == 0 else f"{100 * x:+.1f}"


def readable(base: dict) -> bool:
    """Section 3's rules for a variant: the base model's turn 1 right on >= 15%, ended by itself on >= 95%."""
    return base["metrics"]["acc_t1"] >= 0.15 and base["metrics"]["cut_t1"] <= 0.05


def _acc(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def minus_base(metrics: dict, base: dict | None) -> float | None:
    """Trained minus base: a model's delta among stated answers less the base model's under the same variant."""
    return None if base is None else metrics["delta_stated"] - base["metrics"]["delta_stated"]


def dev_metrics(run: str) -> dict | None:
    """A training run's own evaluation after training: the dev split's numbers."""
    rec = _load(f"evidence_{run}")
    return None if rec is None else next(e for e in rec["evals"] if e["tag"] == "after")


def choose() -> tuple[str | None, dict]:
    """Section 1's rule (evidence.yaml "selection"), on dev numbers only: {schedule: (mean delta among stated,
    mean Acc@t2, seeds measured)} and the chosen schedule (None until every candidate has every seed)."""
    per: dict[str, list[dict | None]] = {}
    for r in P["runs"]:
        if "schedule" in r:
            per.setdefault(r["schedule"], []).append(dev_metrics(r["name"]))
    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None
    means = {k: (mean([a["delta_stated"] for a in v if a]), mean([a["acc_t2"] for a in v if a]),
                 sum(1 for a in v if a)) for k, v in per.items()}
    if any(n < len(per[k]) for k, (_, _, n) in means.items()):
        return None, means
    best = max(d for d, _, _ in means.values())
    near = [k for k, (d, _, _) in means.items() if d >= best - P["selection"]["tie"]]
    return max(near, key=lambda k: means[k][1]), means


def kind(run: dict) -> str:
    """A run's schedule (section 1's candidates) or label (a benchmark beside them), '' for neither."""
    return run.get("schedule") or run.get("label") or ""


def summary() -> list[str]:
    """One row per variant every model reads: trained minus base delta among stated, per seed and mean, of each
    algorithm (and SCoRe schedule), and its mean Acc@t2."""
    algos = {}  # score's schedules apart: "score (15 + 5 + 15 + 5)", "score (30 + 10)", "multi-turn-rl"
    for r in P["runs"]:
        if r["name"] in P["models"]:
            algos.setdefault(r["algo"] + (f" ({kind(r)})" if kind(r) else ""), []).append(r["name"])
    lines = ["", "## Trained minus base, every variant all models read (delta among stated; per seed, mean)", "",
             "| variant | base Acc@t1 / cut t1 (rules) | " + " | ".join(f"{a}: trained minus base | {a}: mean Acc@t2"
                                                         for a in algos) + " |",
             "|---|---|" + "---|---|" * len(algos)]
    for v, spec in P["variants"].items():
        base = _load(f"evidence_eval_embedded_{v}")
        if "models" in spec or base is None:
            continue
        cells = [f"{_acc(base['metrics']['acc_t1'])} / {_acc(base['metrics']['cut_t1'])}% "
                 f"({'met' if readable(base) else 'failed: not read'})"]
        for names in algos.values():
            recs = [_load(f"evidence_eval_{m}_{v}") for m in names]
            got = [x["metrics"] for x in recs if x is not None]
            d = [minus_base(x, base) for x in got]
            seeds = " / ".join(_pct(x) for x in d) + (f" ({len(d)} of {len(names)})" if len(d) < len(names) else "")
            cells += [f"{seeds}: mean {_pct(sum(d) / len(d))}" if d else "not measured",
                      _acc(sum(x["acc_t2"] for x in got) / len(got)) if got else "-"]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines


def table() -> str:
    base = _load("evidence_eval_embedded_dev")
    lines = ["# Evidence (experiments/self-correction/evidence.py), greedy, 128 tokens a turn", "",
             "## Dev split (512 of 833 problems): the training runs' own evaluation", "",
             "| run | schedule | Acc@t1 | Acc@t2 | delta among stated (n) | trained minus base | i->c / c->i stated | "
             "cut t1 |", "|---|---|---|---|---|---|---|---|"]
    if base is not None:
        x = base["metrics"]
        lines.append(f"| embedded (base) | | {_acc(x['acc_t1'])} | {_acc(x['acc_t2'])} | {_pct(x['delta_stated'])} "
                     f"({x['n_stated']}) | | {x['n_i2c_stated']} / {x['n_c2i_stated']} | {_acc(x['cut_t1'])}% |")
    for r in P["runs"]:
        a = dev_metrics(r["name"])
        if a is None:
            lines.append(f"| {r['name']} | {kind(r)} | not run ||||||")
            continue
        rerun = _load(f"evidence_{r['name']}_rerun")
        for label, a in ((r["name"], a), (f"{r['name']} (rerun: {rerun['machine']})" if rerun else None,
                                          next((e for e in rerun["evals"] if e["tag"] == "after"), None)
                                          if rerun else None)):
            if label is None:
                continue
            minus = "" if base is None else _pct(minus_base(a, base))
            lines.append(f"| {label} | {kind(r)} | {_acc(a['acc_t1'])} | {_acc(a['acc_t2'])} | "
                         f"{_pct(a['delta_stated'])} ({a['n_stated']}) | {minus} | {a['n_i2c_stated']} / "
                         f"{a['n_c2i_stated']} | {_acc(a['cut_t1'])}% |")
    chosen, means = choose()
    lines += ["", "Section 1's choice (evidence.yaml `selection`, dev numbers only): "
              + (f"**{chosen}**" if chosen else "not made: a candidate lacks a seed"), "",
              "| schedule | seeds | mean dev delta among stated | mean dev Acc@t2 |", "|---|---|---|---|"]
    lines += [f"| {k} | {n} | {_pct(d)} | {_acc(t)} |" for k, (d, t, n) in means.items()]
    lines += summary()
    for v, spec in P["variants"].items():
        base = _load(f"evidence_eval_embedded_{v}")
        lines += ["", f"## {v}: {' '.join(spec['args'])}", "",
                  "| model | Acc@t1 | Acc@t2 | delta among stated (n) | trained minus base | i->c / c->i stated | "
                  "cut t1 / t2 |", "|---|---|---|---|---|---|---|"]
        for m in models(v):
            rec = _load(f"evidence_eval_{m}_{v}")
            if rec is None:
                lines.append(f"| {m} | not measured ||||||")
                continue
            x = rec["metrics"]
            minus = "" if base is None or m == "embedded" else _pct(minus_base(x, base))
            rerun = _load(f"evidence_{m}_rerun")
            label = m + (" (rerun)" if rerun and rec.get("model_digest") == rerun["model_digest"] else "")
            lines.append(f"| {label} | {_acc(x['acc_t1'])} | {_acc(x['acc_t2'])} | {_pct(x['delta_stated'])} "
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
