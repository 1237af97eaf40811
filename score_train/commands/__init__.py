"""The three commands: `score-train`, `score-eval`, `score-generate` (also `python -m score_train {train,eval,generate}`).

Each parses its command line into a typed config (`score_train.config`), checks its inputs before loading a model,
and runs the library. A `UsageError` prints one line on stderr and exits with status 2; `--debug` shows the
traceback. Nothing in the library imports this package.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = ("train", "eval", "generate")


def main(argv=None) -> int:
    """`python -m score_train [train|eval|generate] ...`; with no command name: train (as before)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    name = argv[0] if argv and argv[0] in COMMANDS else "train"
    rest = argv[1:] if argv and argv[0] in COMMANDS else argv
    return importlib.import_module(f"score_train.commands.{name}").main(rest)
