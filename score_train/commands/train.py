"""score-train: SCoRe and its baselines from one config (`score_train.config.Config`).

Parses the command line, checks every input (`rundir.open_run` without writing: a bad input fails before the
trainer loads a model), then runs `score_train.train.train`.
"""
from __future__ import annotations

import os
import sys

from score_train.commands.args import Alias, parse_command, run_command, usage
from score_train.config import Config
from score_train.config_io import RENAMED, load_saved_config, resume_request
from score_train.rundir import open_run
from score_train.train import train

USAGE = """usage: score-train [--config FILE | --preset demo|math|code] [--resume] [--section.key=value ...]

With no arguments: the `demo` preset (SmolLM2-135M-Instruct on arithmetic, CPU friendly).
Examples:
  score-train --preset math --model.spec=/models/Qwen2.5-1.5B-Instruct --data.task=jsonl:math.jsonl
  score-train --algo.name=multi-turn-rl --run.name=ablation
  score-train --run.name=demo --resume          # the run's own config.yaml; only safe settings may change"""

ALIASES = {"resume": Alias(("run.resume",), const=True, help="continue the run's last complete checkpoint")}


def parse_args(argv: list[str] | None) -> tuple[Config, dict]:
    """score-train's command line. No file and no preset = demo. The returned config remembers which keys the
    command line gave (`cfg.cli_keys`: the overrides and an explicit --config / --preset file's keys): a resumed
    run takes only those over its own saved config.yaml (see `rundir.open_run`), never the preset's defaults."""
    p = parse_command(argv, Config, ALIASES, default_preset="demo", validate=False)
    if p.flags.get("help"):
        return Config(), p.flags
    cfg = p.cfg.validate()
    keys = {k for k, _ in p.overrides}
    if p.file_data:
        keys |= {f"{s}.{k}" for s, sec in p.file_data.items() if isinstance(sec, dict) for k in sec}
    cfg.cli_keys = frozenset(RENAMED.get(k, k) for k in keys)
    saved = os.path.join(cfg.run.out_dir, cfg.run.name, "config.yaml")
    if cfg.run.resume and os.path.isfile(saved):  # (a missing run is reported by rundir.open_run)
        keys = cfg.cli_keys
        cfg = resume_request(cfg, load_saved_config(os.path.dirname(saved))).validate()
        cfg.cli_keys = keys
    return cfg, p.flags


def _train(cfg: Config) -> int:
    open_run(cfg, main=False)  # every check, nothing written
    try:
        train(cfg)
    except RuntimeError as e:
        print(f"score-train: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    return run_command("score-train", argv, parse_args, _train, lambda: usage("score-train", Config, ALIASES, USAGE),
                       help_exits=False)


if __name__ == "__main__":
    sys.exit(main())
