"""A run's pictures and report.md, from the files the run wrote (works on a finished or resumed run):

    reward_per_turn.png   training reward of turn 1 and turn 2 per step (stage boundaries marked)
    eval_accuracy.png     Acc@t1, Acc@t2 and delta(t1,t2) at every evaluation
    edit_distance.png     histogram of the y1 -> y2 edit-distance ratio, first and last evaluation
    report.md             the tables and the pictures

    python -m score_train.report runs/demo
"""
from __future__ import annotations

import glob
import json
import os
import sys


def _load(run_dir: str):
    metrics = []
    p = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(p):
        with open(p) as f:
            metrics = [json.loads(line) for line in f if line.strip()]
    # a resumed run can repeat steps: keep the last line of each step
    by_step = {m["step"]: m for m in metrics}
    metrics = [by_step[s] for s in sorted(by_step)]
    evals = []
    for e in glob.glob(os.path.join(run_dir, "eval_*.json")):
        with open(e) as f:
            evals.append(json.load(f))
    order = {"before": -1, "base": -1}
    evals.sort(key=lambda e: (e.get("step", 0), order.get(e.get("tag"), 0)))
    return metrics, evals


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, ax, path, xlabel, ylabel, grid=True):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    if grid:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rewards(metrics, path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [m["step"] for m in metrics]
    ax.plot(steps, [m.get("reward_t1") for m in metrics], label="turn 1", marker=".")
    if any("reward_t2" in m for m in metrics):
        ax.plot(steps, [m.get("reward_t2", float("nan")) for m in metrics], label="turn 2", marker=".")
    prev = None
    for m in metrics:
        if prev is not None and m.get("stage") != prev:
            ax.axvline(m["step"] - 0.5, color="grey", ls=":", lw=1)
            ax.text(m["step"] - 0.4, ax.get_ylim()[1] * 0.95, m.get("stage", ""), fontsize=7, color="grey")
        prev = m.get("stage")
    _finish(plt, fig, ax, path, "step", "mean reward (sampled)")


def plot_evals(evals, path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = [e.get("step", 0) for e in evals]
    for key, label in (("acc_t1", "Acc@t1"), ("acc_t2", "Acc@t2"), ("delta", "delta(t1,t2)"),
                       ("delta_stated", "delta among stated answers")):
        if any(e.get(key) is not None for e in evals):
            ax.plot(x, [100 * (e.get(key) if e.get(key) is not None else float("nan")) for e in evals],
                    marker="o", label=label)
    ax.axhline(0, color="black", lw=0.5)
    _finish(plt, fig, ax, path, "step", "% of held-out problems (greedy)")


def plot_edit_distance(evals, path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    picks = [evals[0], evals[-1]] if len(evals) > 1 else evals
    for e in picks:
        r = e.get("edit_distance_ratios") or []
        if r:
            ax.hist(r, bins=20, range=(0, 1), alpha=0.5, label=f"{e.get('tag')} (step {e.get('step', 0)})")
    _finish(plt, fig, ax, path, "edit distance(y1, y2) / total length", "problems", grid=False)


def _pct(v):
    return "" if v is None else f"{100 * v:.1f}"


def _stated(e) -> str:
    if "n_stated" not in e:
        return ""
    d = e.get("delta_stated")
    return f"**{'n/a' if d is None else f'{100 * d:+.1f}'}** ({e['n_stated']}/{e.get('n', e.get('num_problems'))})"


def _count(e, key) -> str:
    return "" if key not in e else str(e[key])


EVAL_NOTES = [
    "- **delta among stated answers** (the headline): Acc@t2 - Acc@t1 over the problems whose turn 1 *stated* an "
    "answer (an answer can be read from it and it ended on EOS or a stop string, not on the token limit); in "
    "brackets: stated problems / all problems. A turn 2 that finishes an answer turn 1 never wrote does not count.",
    "- delta, i->c, c->i: the paper's, over all problems (% of them). i->c splits into *stated* (a stated wrong "
    "answer corrected) and *cut/none* (turn 1 cut off or without an answer, turn 2 answered); those two are "
    "counts of problems.",
    "- *i->c stated, right number in y1*: stated corrections whose turn 1 had already written the right number and "
    "ended on another (\"19 + 33 = 52 ... the sum of 19 and 33.\" reads as 33): turn 2 restating it fixes the "
    "reading, not a computation.",
    "- cut@t1, cut@t2: % of answers that ended on the token limit. Above 5% at turn 1, delta and i->c mostly "
    "measure truncation (experiments/self-correction/REPORT.md, 'The 32-token artefact').",
]


def write_report(run_dir: str) -> str:
    metrics, evals = _load(run_dir)
    pics = []
    if metrics:
        plot_rewards(metrics, os.path.join(run_dir, "reward_per_turn.png"))
        pics.append(("Training reward per turn", "reward_per_turn.png"))
    if evals:
        plot_evals(evals, os.path.join(run_dir, "eval_accuracy.png"))
        pics.append(("Held-out accuracy at each evaluation", "eval_accuracy.png"))
        if any(e.get("edit_distance_ratios") for e in evals):
            plot_edit_distance(evals, os.path.join(run_dir, "edit_distance.png"))
            pics.append(("Edit-distance ratio between y1 and y2", "edit_distance.png"))
    summary = {}
    sp = os.path.join(run_dir, "summary.json")
    if os.path.exists(sp):
        with open(sp) as f:
            summary = json.load(f)
    lines = [f"# Run report: {os.path.basename(os.path.abspath(run_dir))}", ""]
    if summary:
        lines += [(f"- algorithm: `{summary.get('algo')}`, steps: {summary.get('steps')}, "
                   f"wall time: {summary.get('wall_s', 0) / 60:.1f} min on {summary.get('device')} "
                   f"({summary.get('threads')} threads)"), ""]
    lines += ["## Evaluation (greedy, held-out problems)", "",
              "| eval | step | problems | delta among stated answers | Acc@t1 | Acc@t2 | delta(t1,t2) | i->c | "
              "i->c stated | i->c cut/none | c->i | cut@t1 | cut@t2 | tokens a turn | "
              "i->c stated, right number in y1 |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in evals:
        lines.append(f"| {e.get('tag')} | {e.get('step', 0)} | {e.get('num_problems', '')} | {_stated(e)} | "
                     f"{_pct(e.get('acc_t1'))} | {_pct(e.get('acc_t2'))} | {_pct(e.get('delta'))} | "
                     f"{_pct(e.get('delta_i2c'))} | {_count(e, 'n_i2c_stated')} | {_count(e, 'n_i2c_unstated')} | "
                     f"{_pct(e.get('delta_c2i'))} | {_pct(e.get('cut_t1'))} | {_pct(e.get('cut_t2'))} | "
                     f"{e.get('max_new_tokens', '')} | {_count(e, 'n_i2c_stated_written')} |")
    lines += [""] + EVAL_NOTES + [""]
    for e in evals:
        if e.get("warning"):
            lines += [f"**Warning ({e.get('tag')}):** " + " ".join(
                ln.removeprefix("WARNING:").strip() for ln in e["warning"].splitlines() if ln.startswith("WARNING")), ""]
    for title, png in pics:
        lines += [f"## {title}", "", f"![{title}]({png})", ""]
    samples = sorted(glob.glob(os.path.join(run_dir, "samples_*.md")))
    if samples:
        lines += ["## Sample tables", ""] + [f"- [{os.path.basename(s)}]({os.path.basename(s)})" for s in samples] + [""]
    out = os.path.join(run_dir, "report.md")
    with open(out, "w") as f:
        f.write("\n".join(lines))
    return out


if __name__ == "__main__":
    for d in sys.argv[1:] or ["runs/demo"]:
        print(write_report(d))
