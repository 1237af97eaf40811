"""The three commands, on one configuration surface (`score_train.config`).

Each command parses its arguments into a typed config, checks its inputs (`score_train.preflight`)
and only then imports and loads the heavy parts. A `UsageError` (a bad setting, a missing model or file,
a malformed JSONL line) prints one line on stderr and exits with status 2; `--debug` shows the traceback.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

from score_train.config import (
    TRAIN_ALIASES,
    Alias,
    EvalCommandConfig,
    GenerateCommandConfig,
    UsageError,
    parse_args,
    parse_command,
    resolve,
    task_kind,
    usage,
)

TRAIN_USAGE = """usage: score-train [--config FILE | --preset demo|math|code] [--resume] [--section.key=value ...]

With no arguments: the `demo` preset (SmolLM2-135M-Instruct on arithmetic, CPU friendly).
Examples:
  score-train --preset math --model.spec=/models/Qwen2.5-1.5B-Instruct --data.task=jsonl:math.jsonl
  score-train --algo.name=multi-turn-rl --run.name=ablation
  score-train --run.name=demo --resume          # the run's own config.yaml; only safe settings may change
Sections: model, data, algo, rollout, optim, eval, run, dist (see docs/trainer.md)."""

EVAL_USAGE = """usage: score-eval --model PATH|embedded [--task TASK] [--n-problems N] [--k K] [--temperature T] [--out FILE]
                  [--section.key=value ...]

Two-turn self-correction evaluation (Acc@t1, Acc@t2, delta, i->c, c->i, edit-distance ratio,
self-consistency) of a model on a task's held-out split. `--config runs/X/config.yaml` evaluates with a
training run's model, data and rollout sections (its other sections are skipped)."""

GENERATE_USAGE = """usage: score-generate --model PATH|embedded --input prompts.jsonl --output out.jsonl [--n N] [--two-turn]
                      [--temperature T] [--top-p P] [--top-k K] [--max-new-tokens M] [--instruction TEXT]
                      [--seed S] [--stop STR ...] [--section.key=value ...]

Samples (two-turn) completions for a JSONL file of {"prompt": ...} lines."""


def _ops(v: str) -> str:
    return v if "," in v else ",".join(v)  # the old `--ops +-*` spelling: one character an operation


def _backend(v: str) -> str:
    return "engine" if v == "auto" else v  # `auto` chose the engine whenever it was there; it always is


_SHARED = {
    "model": Alias(("model.spec",), help="local HF directory, .gguf file, or 'embedded' (SmolLM2-135M)"),
    "temperature": Alias(("rollout.temperature",)),
    "max-new-tokens": Alias(("rollout.max_new_tokens",), help="per turn (0 = the task's default)"),
    "device": Alias(("run.device",)),
    "dtype": Alias(("model.dtype",)),
    "instruction": Alias(("rollout.instruction",), convert=str),
    "reply-prefix": Alias(("rollout.reply_prefix",), convert=str),
}

EVAL_ALIASES = {
    **_SHARED,
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

GENERATE_ALIASES = {
    **_SHARED,
    "input": Alias(("generate.input",)),
    "output": Alias(("generate.output",)),
    "n": Alias(("rollout.n",)),
    "top-p": Alias(("rollout.top_p",)),
    "top-k": Alias(("generate.top_k",)),
    "two-turn": Alias(("generate.two_turn",), const=True),
    "seed": Alias(("run.seed",)),
    "stop": Alias(("generate.stop",), convert=str, append=True),
}


def _main(prog: str, argv, parse: Callable, run: Callable, help_text: Callable[[], str], *,
          help_exits: bool) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        cfg, flags = parse(argv)
        if flags.get("help"):
            print(help_text())
            if help_exits:  # as argparse did for score-eval / score-generate
                raise SystemExit(0)
            return 0
        return int(run(cfg) or 0)
    except UsageError as e:
        if debug:
            raise
        msg = " ".join(str(e).split("\n"))
        print(f"{prog}: error: {msg} (--help: usage, --debug: traceback)", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------- score-train

def _train(cfg) -> int:
    from score_train.rundir import open_run

    open_run(cfg, main=False)  # every check, nothing written: a bad input fails before the trainer's imports
    from score_train.train import train

    try:
        train(cfg)
    except RuntimeError as e:
        print(f"score-train: {e}", file=sys.stderr)
        return 1
    return 0


def train_main(argv=None) -> int:
    from score_train.config import Config

    return _main("score-train", argv, parse_args, _train,
                 lambda: usage("score-train", Config, TRAIN_ALIASES, TRAIN_USAGE), help_exits=False)


# ---------------------------------------------------------------------------- score-eval

def parse_eval_args(argv) -> tuple[EvalCommandConfig, dict]:
    p = parse_command(argv, EvalCommandConfig, EVAL_ALIASES)
    return p.cfg, p.flags


def prepare_eval(cfg: EvalCommandConfig):
    """Checks and the records, before any model is loaded: -> (resolved cfg, records)."""
    from score_train.preflight import check_device, check_model, check_nonempty, load_records

    check_model(cfg.model.spec)
    check_device(cfg.run.device)
    records = load_records(cfg.data, cfg.evaluate.split, cfg.data.eval_size)
    check_nonempty(records, cfg.data, cfg.evaluate.split)
    if cfg.evaluate.k != 0 and not cfg.rollout.temperature > 0:
        raise UsageError("rollout.temperature must be > 0 for the sampled evaluation (or --k 0: greedy only)")
    return resolve(cfg, task_kind(cfg.data.task, records)), records


def _eval(cfg) -> int:
    from score_train import eval as ev

    cfg, records = prepare_eval(cfg)
    return ev.run_command(cfg, records)


def eval_main(argv=None) -> int:
    return _main("score-eval", argv, parse_eval_args, _eval,
                 lambda: usage("score-eval", EvalCommandConfig, EVAL_ALIASES, EVAL_USAGE), help_exits=True)


# ---------------------------------------------------------------------------- score-generate

def parse_generate_args(argv) -> tuple[GenerateCommandConfig, dict]:
    p = parse_command(argv, GenerateCommandConfig, GENERATE_ALIASES)
    return p.cfg, p.flags


def _generate(cfg) -> int:
    from score_train.preflight import check_device, check_model
    from score_train.rollout import cli as gen

    check_model(cfg.model.spec)
    check_device(cfg.run.device)
    try:
        prompts = gen.read_prompts(cfg.generate.input)
    except (OSError, ValueError) as e:
        raise UsageError(f"generate.input: {e}") from None
    return gen.run_command(resolve(cfg, cfg.generate.kind), prompts)


def generate_main(argv=None) -> int:
    return _main("score-generate", argv, parse_generate_args, _generate,
                 lambda: usage("score-generate", GenerateCommandConfig, GENERATE_ALIASES, GENERATE_USAGE),
                 help_exits=True)
