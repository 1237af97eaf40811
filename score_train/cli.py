"""Console entry points. Each imports its implementation lazily so that `--help` stays fast."""
from __future__ import annotations

import sys


def _run(module: str, what: str, argv=None) -> int:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("score_train"):
            print(f"{what} is not there yet ({module} is missing).", file=sys.stderr)
            return 2
        raise
    return int(mod.main(argv) or 0)


def train_main(argv=None) -> int:
    return _run("score_train.train", "score-train", argv)


def eval_main(argv=None) -> int:
    return _run("score_train.eval", "score-eval", argv)


def generate_main(argv=None) -> int:
    return _run("score_train.rollout.cli", "score-generate", argv)
