"""The demo's measurements (issue 13 §3-§4): `score-train` runs over seeds, algorithms, alpha and turn counts,
each recorded under benchmarks/results/, then one table with the pooled sign test.

    python benchmarks/demo_sweep.py main            # 3 seeds x {score, multi-turn-rl}, the shipped demo preset
    python benchmarks/demo_sweep.py recompute_s30x2 # 3 seeds of score, the preset's settings spelled out
    python benchmarks/demo_sweep.py recompute_s30   # 3 seeds of score, 30 + 10 steps without interleaving
    python benchmarks/demo_sweep.py recompute       # 3 seeds x {score, multi-turn-rl}, 20 + 20 steps
    python benchmarks/demo_sweep.py alpha           # alpha in {0, 1, 10, 30}, seed 0
    python benchmarks/demo_sweep.py turns           # --algo.num_turns=3, seed 0 (when the trainer supports it)
    python benchmarks/demo_sweep.py alpha1          # alpha 1 over 3 seeds
    python benchmarks/demo_sweep.py levers          # eleven single levers, seed 0 (SWEEPS['levers'])
    python benchmarks/demo_sweep.py table           # re-tabulate the records already written
    python benchmarks/demo_sweep.py main --only demo_score_seed1 --run.threads=1   # one run of a sweep
    python benchmarks/demo_sweep.py one --name demo_try_x --algo.beta2=0.5         # a lever: any overrides
    python benchmarks/demo_sweep.py audit --name demo_alpha1_seed0 --out-dir DIR   # re-evaluate a finished run
    python benchmarks/demo_sweep.py audit --name demo_alpha1_seed0 --step step_000020  # ... at the end of Stage I
    python benchmarks/demo_sweep.py export --name demo_bf16_pairsft40_seed0 --to DIR   # its model, for --model.spec=DIR

Two runs side by side on 2 cores (`--only` each, `--run.threads=1`) take about 40 min each instead of 29.

Each run is a plain `score-train` subprocess with the preset's settings plus the sweep's overrides, so a
record's wall time is what a user would see (model load and both evaluations included). These are long
measurements (about 29 min a run on a quiet 2-core machine): benchmarks with records, never part of the test suite.
A run's record keeps its final evaluation (greedy, held-out), the base evaluation, the truncation counts and
the config; the table's headline is delta among stated answers (turn 1 ended by itself with an answer).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
SEEDS = (0, 1, 2)
KEEP_INSTRUCTION = ("Check the answer above. If it is right, repeat it. If it is wrong, give the right answer. "
                    "Answer with just the number.")
SWEEPS = {
    "main": [(f"demo_{algo}_seed{s}", [f"--algo.name={algo}", f"--run.seed={s}"])
             for algo in ("score", "multi-turn-rl") for s in SEEDS],
    "alpha": [(f"demo_alpha{a:g}_seed0", [f"--algo.alpha={a}", "--run.seed=0"]) for a in (0.0, 1.0, 10.0, 30.0)],
    "turns": [("demo_turns3_seed0", ["--algo.num_turns=3", "--run.seed=0"])],
    # seeds 1-2 of the one alpha that looked like self-correction at seed 0 (seed 0 is the alpha sweep's run)
    "alpha1": [(f"demo_alpha1_seed{s}", ["--algo.alpha=1.0", f"--run.seed={s}"]) for s in SEEDS],
    # single levers, seed 0: Stage I alone (does turn 2 already copy turn 1 before the shaping bonus?); the one
    # turn-2 instruction that helped the base model in the probe; three operands with + and -, and two with + and -
    # (more stated mistakes, of another kind); alpha 1 (the best seed-0 delta) at 3.3x the learning rate; a Stage I
    # twice as long (40 + 20 steps: 33 minutes, over the demo's 30); LoRA rank 16 on the same top 8 layers instead
    # of their weights (its lr 1e-4: Adam moves B by about lr a step, and alpha / r * B A with A at peft's init then
    # moves each weight by about a fifth of that, 2e-5 a step, near the preset's 3e-5 full-weight steps)
    "levers": [("demo_stage1only_seed0", ["--algo.stage2_steps=0", "--run.seed=0"]),
               ("demo_keepinstr_seed0", [f"--rollout.instruction={KEEP_INSTRUCTION}", "--run.seed=0"]),
               ("demo_3operands_seed0", ["--data.n_operands=3", "--data.ops=+,-", "--run.seed=0"]),
               ("demo_plusminus_seed0", ["--data.ops=+,-", "--run.seed=0"]),
               ("demo_lr1e-4_alpha1_seed0", ["--optim.lr=1e-4", "--algo.alpha=1.0", "--run.seed=0"]),
               ("demo_stage1x2_seed0", ["--algo.stage1_steps=40", "--run.seed=0"]),
               ("demo_lora16_lr1e-4_seed0", ["--model.lora_rank=16", "--model.lora_alpha=32", "--optim.lr=1e-4",
                                             "--run.seed=0"]),
               # twice the steps in the budget: bf16 rollouts and update (fast only on a CPU with AMX-BF16)
               ("demo_bf16_steps40x40_seed0", ["--rollout.dtype=bfloat16", "--model.autocast_bf16=true",
                                               "--algo.stage1_steps=40", "--algo.stage2_steps=40", "--run.seed=0"]),
               # twice the samples per prompt (n = 8) in the same budget, the same way
               ("demo_bf16_n8_seed0", ["--rollout.dtype=bfloat16", "--model.autocast_bf16=true", "--rollout.n=8",
                                       "--run.seed=0"]),
               # the same turn-2 samples a step as n = 8, as 2 turn-2 branches of each of 4 turns 1: turn 2's
               # baseline is then its sibling after the same y1 (did this turn 2 do better from that y1?)
               ("demo_bf16_turn2x2_seed0", ["--rollout.dtype=bfloat16", "--model.autocast_bf16=true",
                                            "--rollout.turn2_n=2", "--run.seed=0"]),
               # Pair-SFT (the paper's baseline) on the demo budget: does an SFT'd turn 2 stop copying? Its export
               # (`export --name demo_bf16_pairsft40_seed0 --to DIR`) then starts demo_bf16_pairsft40_then_score_seed0:
               # the preset's SCoRe with --model.spec=DIR and the same bf16 settings
               ("demo_bf16_pairsft40_seed0", ["--algo.name=pair-sft", "--algo.steps=40", "--rollout.dtype=bfloat16",
                                              "--model.autocast_bf16=true", "--run.seed=0"])],
}
# The preset since the turn-2 opening (its instruction and reply prefix spelled out, so that the records mean the
# same whatever the preset later says): 3 seeds x {score, multi-turn-rl}
RECOMPUTE = ["--rollout.instruction=Please solve the problem again.", "--rollout.reply_prefix=Let me recompute: "]
SWEEPS["recompute"] = [(f"demo_recompute_{algo}_seed{s}", [*RECOMPUTE, f"--algo.name={algo}", f"--run.seed={s}"])
                       for algo in ("score", "multi-turn-rl") for s in SEEDS]
# The same preset with a longer Stage I and a shorter Stage II (30 + 10, the same 40 steps): at the end of Stage I
# (step 20) seed 0 corrected 32 stated answers and broke 6 (+5.3); 20 steps of Stage II then taught turn 1 the
# recomputation (26.2 -> 35.5) and left +1.8. Stage II's turn-1 reward r1 is what moves turn 1, so fewer of its steps
# keep more of Stage I's correction while still shaping turn 2 with alpha (r2 - r1).
SWEEPS["recompute_s30"] = [(f"demo_recompute_s30_score_seed{s}", [*RECOMPUTE, "--algo.name=score",
                                                                  "--algo.stage1_steps=30", "--algo.stage2_steps=10",
                                                                  f"--run.seed={s}"]) for s in SEEDS]
# At the end of Stage I (the step-30 checkpoints) seeds 1 and 2 corrected 30 vs 8 and 28 vs 11 (+4.4, +3.4); their
# 10 Stage II steps left +1.8 and +0.4 (turn 1 up 9.2 and 10.5 points). The paper's v1 schedule runs the stages twice
# ("two applications each of Stage I and II"): 15 + 5 + 15 + 5 steps. The second Stage I pulls turn 1 back towards
# the base (beta2 KL, no turn-1 reward) while turn 2 trains on, and the last Stage II is 5 steps, not 10.
SWEEPS["recompute_s30x2"] = [(f"demo_recompute_s30x2_score_seed{s}", [*RECOMPUTE, "--algo.name=score",
                                                                      "--algo.stage1_steps=30",
                                                                      "--algo.stage2_steps=10",
                                                                      "--algo.interleave=2", f"--run.seed={s}"])
                             for s in SEEDS]
# Records of earlier presets, tabulated by `table` (the bare "What is {expr}?" prompt, 10 + 10 steps, commit 0827858)
EARLIER = ("demo_score_seed0_t07", "demo_mtrl_seed0_t07")


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    """Cores, CPU model, its bf16 matmul units (bf16 speed depends on them: AMX-BF16 or AVX512-BF16, else none)
    and the load average."""
    cpu, flags = platform.processor() or "cpu", set()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = next(x.split(":", 1)[1].strip() for x in lines if x.startswith("model name"))
        flags = set(next((x.split(":", 1)[1].split() for x in lines if x.startswith("flags")), []))
    except (OSError, StopIteration):
        pass
    bf16 = "AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "no bf16 units"
    return f"{os.cpu_count()} cores ({cpu}; {bf16}), load average at start {os.getloadavg()[0]:.1f}"


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
    proc = subprocess.run(cmd, cwd=os.path.dirname(HERE))
    wall = time.perf_counter() - t0
    run_dir = os.path.join(out_dir, name)
    rec = {"run": name, "command": "score-train " + " ".join(cmd[3:]), "commit": commit(), "machine": machine(),
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
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
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
    import torch

    from score_train import checkpoint
    from score_train.config import load_config
    from score_train.model import load_model
    from score_train.train import prepare_policy

    if rec is None:
        with open(os.path.join(RESULTS, f"{name}.json")) as f:
            rec = json.load(f)
    # the run's directory, from the recorded command (a record may keep an earlier run name)
    flags = dict(x.split("=", 1) for x in rec.get("command", "").split(" --")[1:] if "=" in x)
    run_dir = os.path.join(out_dir, flags.get("run.name", name))
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    model, tok = load_model(cfg.model.spec, dtype=torch.float32)
    prepare_policy(model, cfg.model)  # what the checkpoint holds (the trained layers, or LoRA adapters)
    ckpts = os.path.join(run_dir, "checkpoints")
    last = os.path.join(ckpts, step) if step else checkpoint.latest(ckpts)
    if last is None or not os.path.isdir(last):
        raise FileNotFoundError(f"{name}: no {'checkpoint ' + step if step else 'complete checkpoint'} under {ckpts}")
    checkpoint.load(last, model, restore_rng=False)
    return cfg, model, tok, last


def audit_key(step: str = "") -> str:
    return f"audit_{step}" if step else "audit"


def audit(name: str, out_dir: str, step: str = "") -> dict:
    """Re-evaluate a finished run's final checkpoint with today's evaluation (greedy, its own config) and keep
    the result in its record as "audit": the counts added since it ran (n_i2c_stated_written, delta_stated_new),
    whether it reproduces the recorded final evaluation, and the texts of every stated correction and breakage.
    step: another checkpoint of the run instead (e.g. step_000020, the end of Stage I), kept as "audit_<step>"
    (reproduces_recorded_eval is then None: no evaluation of it was recorded)."""
    import torch

    from score_train.eval import evaluate
    from score_train.preflight import load_records
    from score_train.rollout.engine import Engine

    path = os.path.join(RESULTS, f"{name}.json")
    with open(path) as f:
        rec = json.load(f)
    torch.set_num_threads(1)  # greedy outputs do not depend on it (reproduces_recorded_eval checks)
    cfg, model, tok, last = run_model(name, out_dir, step, rec)
    model.eval()
    recs = load_records(cfg.data, "eval", cfg.data.eval_size)
    g = evaluate(Engine(model, tok), recs, max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                 style=cfg.rollout.style, seed=cfg.run.seed, warn=False, num_turns=cfg.algo.num_turns,
                 instruction=cfg.rollout.instruction, reply_prefix=cfg.rollout.reply_prefix)["greedy"]
    m, after = g["metrics"], (row(rec) or {}).get("after") or {}
    keys = ("acc_t1", "acc_t2", "n_stated", "n_i2c_stated", "n_c2i_stated")
    probs = {r.id: r.problem for r in recs}
    rec[audit_key(step)] = {
        "commit": commit(), "checkpoint": os.path.basename(last), "metrics": m,
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
    """(name, row or None) for each name with a record under RESULTS."""
    for name in names:
        path = os.path.join(RESULTS, f"{name}.json")
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
    ap.add_argument("--name", default="", help="one: the run's name (its record is benchmarks/results/NAME.json)")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(HERE), "runs", "sweep"))
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
    with open(os.path.join(RESULTS, "demo_sweep.md"), "w") as f:
        f.write(f"# Demo sweep (benchmarks/demo_sweep.py), commit {commit()}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
