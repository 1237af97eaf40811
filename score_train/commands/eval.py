"""score-eval: two-turn self-correction evaluation (Acc@t1, Acc@t2, delta among stated answers, i->c, c->i,
edit-distance ratio, self-consistency) of a model on a task's held-out split."""
from __future__ import annotations

import dataclasses
import json
import sys
import time

import torch

from score_train import model as modeling
from score_train import trained_settings
from score_train.commands.args import Alias, parse_command, run_command, usage
from score_train.config import EvalCommandConfig, UsageError, resolve, task_kind
from score_train.config_io import build
from score_train.eval import evaluate, format_table
from score_train.preflight import check_device, check_model, check_nonempty, load_records
from score_train.rewards import RewardPool
from score_train.rollout import make_rollout

USAGE = """usage: score-eval --model PATH|embedded [--task TASK] [--n-problems N] [--k K] [--temperature T] [--out FILE]
                  [--section.key=value ...]

Two-turn self-correction evaluation of a model on a task's held-out split. `--config runs/X/config.yaml` evaluates
with a training run's model, data and rollout sections (its other sections are skipped).
Example:
  score-eval --model runs/demo/final_model --task arithmetic --n-problems 512"""


def _ops(v: str) -> str:
    return v if "," in v else ",".join(v)  # the `--ops +-*` spelling: one character an operation


def _backend(v: str) -> str:
    return "engine" if v == "auto" else v  # `auto` chose the engine whenever it was there; it always is


SHARED = {
    "model": Alias(("model.spec",), help="local HF directory, .gguf file, or 'embedded' (SmolLM2-135M)"),
    "temperature": Alias(("rollout.temperature",)),
    "max-new-tokens": Alias(("rollout.max_new_tokens",), help="per turn (0 = the task's default)"),
    "device": Alias(("run.device",)),
    "dtype": Alias(("model.dtype",)),
    "instruction": Alias(("rollout.instruction",), convert=str),
    "reply-prefix": Alias(("rollout.reply_prefix",), convert=str),
}

ALIASES = {
    **SHARED,
    "task": Alias(("data.task",), help="arithmetic | champ | humaneval | jsonl:PATH"),
    "split": Alias(("evaluate.split",)),
    "n-problems": Alias(("data.eval_size",)),
    "k": Alias(("evaluate.k",)),
    "no-greedy": Alias(("evaluate.greedy",), const=False),
    "style": Alias(("rollout.style",)),
    "digits": Alias(("data.digits",)),
    "operands": Alias(("data.n_operands",)),
    "ops": Alias(("data.ops",), convert=_ops, help="e.g. +-* or +,-,*"),
    "seed": Alias(("data.seed", "run.seed"), help="the problems drawn and the sampling"),
    "backend": Alias(("rollout.engine",), convert=_backend, help="engine | hf"),
    "out": Alias(("evaluate.out",)),
    "no-samples": Alias(("evaluate.samples",), const=False),
}


def parse_args(argv) -> tuple[EvalCommandConfig, dict]:
    """The command line, over the settings a trained model directory carries (trained_settings): those fill every
    self-correction key the command line and its --config file leave unset."""
    p = parse_command(argv, EvalCommandConfig, ALIASES, validate=False)
    if p.cfg is not None:
        p = with_trained_settings(p, EvalCommandConfig, "score-eval")
    return p.cfg, p.flags


def with_trained_settings(p, cls, prog: str, keys: dict = trained_settings.KEYS):
    """p (a Parsed command line) with the model's carried settings under its own keys; says which on stderr."""
    given = {k for k, _ in p.overrides} | {f"{s}.{k}" for s, sec in (p.file_data or {}).items()
                                            if isinstance(sec, dict) for k in sec}
    pairs, line = trained_settings.defaults_for(p.cfg.model.spec, given, keys)
    if line:
        print(f"{prog}: {line}", file=sys.stderr)
    cfg = build(cls, p.file_data, pairs + list(p.overrides)).validate()
    return dataclasses.replace(p, cfg=cfg)


def prepare(cfg: EvalCommandConfig):
    """Checks and the records, before any model is loaded: -> (resolved cfg, records)."""
    check_model(cfg.model.spec)
    check_device(cfg.run.device)
    records = load_records(cfg.data, cfg.evaluate.split, cfg.data.eval_size)
    check_nonempty(records, cfg.data, cfg.evaluate.split)
    if cfg.evaluate.k != 0 and not cfg.rollout.temperature > 0:
        raise UsageError("rollout.temperature must be > 0 for the sampled evaluation (or --k 0: greedy only)")
    return resolve(cfg, task_kind(cfg.data.task, records)), records


def evaluate_model(cfg: EvalCommandConfig, records) -> int:
    """score-eval on checked inputs: cfg is resolved (budgets filled in) and records are read."""
    kind = records[0].kind
    device = cfg.run.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    e = cfg.evaluate
    k = e.k
    if k < 0:
        k = 4 if device.startswith("cuda") else 0
        if k == 0:
            log("CPU: greedy only (pass --k K for sampled metrics and self-consistency)")
    t0 = time.perf_counter()
    model, tok = modeling.load_model(cfg.model.spec, dtype=getattr(torch, cfg.model.dtype), device=device)
    rollout = make_rollout(model, tok, engine=cfg.rollout.engine, batch_size=16)
    log(f"loaded {cfg.model.spec} ({cfg.rollout.engine} backend, {device}) in {time.perf_counter() - t0:.1f}s; "
        f"{len(records)} problems, {cfg.rollout.max_new_tokens} new tokens per turn, k={k}")
    pool = RewardPool() if kind == "code" else None
    try:
        result = evaluate(rollout, records, cfg.rollout, k=k, greedy=e.greedy, seed=cfg.run.seed, reward_pool=pool,
                          keep_samples=e.samples, log=log, progress=cfg.run.progress, num_turns=e.num_turns)
    finally:
        if pool is not None:
            pool.close()
    task, d = cfg.data.task, cfg.data
    arith = ({"arithmetic": {"digits": d.digits, "n_operands": d.n_operands, "ops": list(d.ops),
                             "operand_digits": list(d.operand_digits),
                             "prompt_format": d.prompt_format}} if task == "arithmetic" else {})
    result = {"model": cfg.model.spec, "task": task, "split": e.split, "backend": cfg.rollout.engine, "device": device,
              "seed": cfg.run.seed, "max_new_tokens": cfg.rollout.max_new_tokens, **arith, **result,
              "config": cfg.to_dict()}  # the resolved settings, budgets filled in
    print(format_table(result))
    out = e.out or f"score-eval-{task.replace(':', '_').replace('/', '_')}.json"
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    return 0


def _run(cfg: EvalCommandConfig) -> int:
    cfg, records = prepare(cfg)
    return evaluate_model(cfg, records)


def main(argv=None) -> int:
    return run_command("score-eval", argv, parse_args, _run,
                       lambda: usage("score-eval", EvalCommandConfig, ALIASES, USAGE), help_exits=True)


if __name__ == "__main__":
    sys.exit(main())
