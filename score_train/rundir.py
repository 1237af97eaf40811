"""A training run's directory: opened only after the inputs are checked, resumed only as it was.

    run = open_run(cfg)        # checks config and inputs (no model load), then creates <out_dir>/<name>/
    run.cfg                    # the resolved config (saved as config.yaml), or a resumed run's own one
    Logger(run.dir, cfg, resume_step=state["step"])   # metrics.jsonl without the steps a resume redoes

Resume (`run.resume=true`) continues `<out_dir>/<name>` with its own config.yaml: the settings given
now apply only where they cannot change what the run computes (`config_io.RESUME_SAFE`), and are logged
in `resume.log`; any other difference is refused. A finished run resumed only says so.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import torch
from tqdm.auto import tqdm

from score_train import algos, checkpoint
from score_train import distributed as D
from score_train.config import Config, UsageError, resolve, task_kind
from score_train.config_io import dump_config, load_saved_config, merge_resume, resume_request
from score_train.eval import headline, write_samples
from score_train.preflight import check_device, check_model, check_nonempty, load_records

RL_ALGOS = ("score", "multi-turn-rl", "single-turn-rl")


@dataclasses.dataclass
class Run:
    dir: str | None  # None on ranks other than 0 (they write nothing)
    cfg: Config
    kind: str  # the records' kind: arithmetic | math | code
    finished: dict | None = None  # a finished run's summary.json (resumed: nothing to do)
    overrides: list[str] = dataclasses.field(default_factory=list)  # the safe changes of a resume


def check_inputs(cfg: Config) -> str:
    """Everything that can be checked without loading the model; returns the records' kind."""
    cfg.validate()
    if cfg.algo.name in RL_ALGOS and not cfg.rollout.temperature > 0:
        raise UsageError(f"rollout.temperature must be > 0 for {cfg.algo.name} (the loss scores the sampled "
                         f"tokens at the sampling temperature); got {cfg.rollout.temperature}")
    check_model(cfg.model.spec)
    check_device(cfg.run.device)
    recs = load_records(cfg.data, cfg.eval.split, cfg.data.eval_size)
    check_nonempty(recs, cfg.data, cfg.eval.split)
    if algos.total_steps(cfg.algo) > 0:
        train = load_records(cfg.data, "train", cfg.data.train_size)
        check_nonempty(train, cfg.data, "train")
    return task_kind(cfg.data.task, recs)


def new_run_dir(cfg: Config) -> str:
    """<out_dir>/<name>, or <name>-N when that holds another run (never silently: it says so)."""
    run_dir = os.path.join(cfg.run.out_dir, cfg.run.name)
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        i = 1
        while os.path.isdir(f"{run_dir}-{i}") and os.listdir(f"{run_dir}-{i}"):
            i += 1
        print(f"{run_dir} exists; writing to {run_dir}-{i} (use --resume to continue it)", file=sys.stderr)
        run_dir = f"{run_dir}-{i}"
    os.makedirs(run_dir, exist_ok=True)
    return run_dir


def prepare_run_dir(cfg: Config) -> str:
    """The run directory of cfg (created): the existing one when resuming, else a new one."""
    if cfg.run.resume:
        run_dir = os.path.join(cfg.run.out_dir, cfg.run.name)
        os.makedirs(run_dir, exist_ok=True)
        return run_dir
    return new_run_dir(cfg)


def _finished(run_dir: str, cfg: Config) -> dict | None:
    path = os.path.join(run_dir, "summary.json")
    last = checkpoint.latest(os.path.join(run_dir, "checkpoints"))
    step = checkpoint.step_of(last) if last else 0
    if not os.path.isfile(path) or step < algos.total_steps(cfg.algo):
        return None
    with open(path) as f:
        return json.load(f)


def open_run(cfg: Config, *, main: bool = True, ranks: int = 1) -> Run:
    """Check cfg and its inputs, then open the run directory (on rank 0 only when `main` is False elsewhere).
    Raises UsageError, leaving nothing behind, when a check fails or a resume would change the run."""
    if not cfg.run.resume:
        kind = check_inputs(cfg)
        cfg = resolve(cfg, kind)
        run_dir = None
        if main:
            run_dir = new_run_dir(cfg)
            cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=os.path.basename(run_dir)))
            with open(os.path.join(run_dir, "config.yaml"), "w") as f:
                f.write(dump_config(cfg))
            print(f"score-train: run directory {run_dir} (ranks: {ranks})\n--- resolved config ---\n"
                  f"{dump_config(cfg)}", file=sys.stderr)
        return Run(run_dir, cfg, kind)
    run_dir = os.path.join(cfg.run.out_dir, cfg.run.name)
    saved = load_saved_config(run_dir)
    kind = check_inputs(saved)
    merged, changes = merge_resume(saved, resolve(resume_request(cfg, saved), kind), run_dir)
    done = _finished(run_dir, merged)
    if main:
        if done is not None:
            print(f"score-train: {run_dir} is finished ({done.get('steps')} steps, summary.json); nothing to "
                  "do. Start a new run (another --run.name) to train further.", file=sys.stderr)
        else:
            last = checkpoint.latest(os.path.join(run_dir, "checkpoints"))
            step = checkpoint.step_of(last) if last else 0
            note = "; ".join(changes) if changes else "none"
            with open(os.path.join(run_dir, "resume.log"), "a") as f:
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} resumed at step {step} "
                        f"(ranks: {ranks}); overrides: {note}\n")
            print(f"score-train: resuming {run_dir} at step {step} with its own config.yaml; overrides: {note}"
                  f"\n--- resolved config ---\n{dump_config(merged)}", file=sys.stderr)
    return Run(run_dir if main else None, merged, kind, done, changes)


def truncate_metrics(path: str, step: int):
    """Drop the metrics lines of steps after `step` (a resume redoes them) and a torn last line."""
    if not os.path.exists(path):
        return
    keep, changed = [], False
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                changed = True
                continue
            if isinstance(rec, dict) and rec.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
            else:
                changed = True
    if changed:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)


class Logger:
    """metrics.jsonl always; TensorBoard / W&B when asked for and installed. `resume_step`: the checkpoint's
    step, so that a resumed run's file holds every step once."""

    def __init__(self, run_dir: str | None, cfg: Config, *, resume_step: int = 0):
        self.f = self.tb = self.wb = None
        if run_dir is None:  # ranks other than 0 log nothing
            return
        path = os.path.join(run_dir, "metrics.jsonl")
        truncate_metrics(path, resume_step)
        self.f = open(path, "a")  # noqa: SIM115 - open for the whole run
        if cfg.run.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(run_dir, "tb"))
            except ImportError:
                print("tensorboard is not installed; logging to metrics.jsonl only", file=sys.stderr)
        if cfg.run.wandb:
            try:
                import wandb

                self.wb = wandb.init(project="score", name=cfg.run.name, config=cfg.to_dict())
            except ImportError:
                print("wandb is not installed; logging to metrics.jsonl only", file=sys.stderr)

    def log(self, rec: dict):
        if self.f is None:
            return
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        nums = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb:
            for k, v in nums.items():
                self.tb.add_scalar(k, v, rec["step"])
        if self.wb:
            self.wb.log(nums, step=rec["step"])

    def close(self):
        if self.f:
            self.f.close()
        if self.tb:
            self.tb.close()
        if self.wb:
            self.wb.finish()


# ---------------------------------------------------------------------------- what a step and the run write

def step_record(ro, upd: dict, lr: float, elapsed_s: float, info) -> dict:
    """The metrics line of one step (means over ranks, sums for counts and throughputs)."""
    r = ro.rewards
    rec = {"step": ro.step + 1, "stage": ro.stage, "reward_t1": float(r[:, 0].mean()), "lr": lr, **ro.stats,
           "kept_samples": len(ro.train_samples), **upd}
    if r.shape[1] > 1:
        rec["reward_t2"] = float(r[:, 1].mean())
        rec["i2c"] = float(((r[:, 0] < 0.5) & (r[:, 1] > 0.5)).float().mean())
        rec["c2i"] = float(((r[:, 0] > 0.5) & (r[:, 1] < 0.5)).float().mean())
    for k in range(2, r.shape[1]):  # a third turn and later: its reward and its changes from the turn before
        rec[f"reward_t{k + 1}"] = float(r[:, k].mean())
        rec[f"i2c_t{k}{k + 1}"] = float(((r[:, k - 1] < 0.5) & (r[:, k] > 0.5)).float().mean())
        rec[f"c2i_t{k}{k + 1}"] = float(((r[:, k - 1] > 0.5) & (r[:, k] < 0.5)).float().mean())
    rec["elapsed_s"] = elapsed_s
    return D.all_mean_metrics(rec, info, keep=("step", "lr"), sum_keys=(
        "loss", "gen_tokens", "gen_tokens_per_s", "kept_samples", "policy_tokens", "packed_tokens",
        "update_tokens_per_s"))


def write_train_samples(run_dir: str, ro, rows: int):
    r = ro.rewards
    write_samples(os.path.join(run_dir, f"samples_train_step{ro.step + 1}.md"),
                  [{"problem": ro.records[s.prompt_index].problem, "y1": s.turn1_text, "y2": s.turn2_text,
                    "r1": float(r[i, 0]), "r2": float(r[i, 1]) if r.shape[1] > 1 else None}
                   for i, s in enumerate(ro.samples[:rows])])


class Progress:
    """A tqdm bar on rank 0 when run.progress is on; otherwise nothing."""

    def __init__(self, cfg: Config, total: int, start: int, info):
        self.bar = None
        if cfg.run.progress and total > 0 and info.is_main:
            self.bar = tqdm(total=total, initial=start, desc=cfg.algo.name, dynamic_ncols=True)

    def update(self, rec: dict):
        if self.bar is None:
            return
        post = {"stage": rec["stage"], "r1": f"{rec['reward_t1']:.2f}"}
        if "reward_t2" in rec:
            post["r2"] = f"{rec['reward_t2']:.2f}"
        if "kl_t1" in rec:
            post["kl"] = f"{rec.get('kl_t1', 0):.3g}/{rec.get('kl_t2', 0):.3g}"
        tokens = rec.get("packed_tokens", 0) + rec["gen_tokens"]
        post["tok/s"] = f"{tokens / max(rec['update_s'] + rec['rollout_s'], 1e-9):.0f}"
        self.bar.update(1)
        self.bar.set_postfix(post)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def write_summary(run_dir: str, cfg: Config, total: int, t_start: float, state: dict, info) -> dict:
    summary = {"run_dir": run_dir, "algo": cfg.algo.name, "steps": total, "wall_s": time.perf_counter() - t_start,
               "headline": headline(state["evals"]), "evals": state["evals"], "threads": torch.get_num_threads(),
               "device": str(info.device)}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    try:
        from score_train import report

        report.write_report(run_dir)
    except ImportError as e:  # matplotlib is optional
        print(f"report skipped: {e}", file=sys.stderr)
    return summary
