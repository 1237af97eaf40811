"""Task sources. `load_task(spec, split, n, seed)` is the one entry point:

    spec: "arithmetic" | "champ" | "humaneval" | "jsonl:PATH"
    split: "train" | "dev" | "eval" | "all"

Held-out problems: arithmetic assigns every distinct expression to one split by a hash; the fixed
datasets split by a hash of the record id with `eval_fraction` (default 0.2). `dev_fraction` > 0 carves a dev
split from the train side (choose settings on it; no training run draws it). A reported evaluation uses "eval".
"""
from __future__ import annotations

import random

from score_train.data.arithmetic import ArithmeticConfig, split_expressions
from score_train.data.arithmetic import generate as generate_arithmetic
from score_train.data.champ import load_champ
from score_train.data.humaneval import load_humaneval
from score_train.data.jsonl import JsonlFormatError, load_jsonl
from score_train.data.records import Record, select_split, split_of

__all__ = ["ArithmeticConfig", "JsonlFormatError", "Record", "generate_arithmetic", "load_champ",
           "load_humaneval", "load_jsonl", "load_task", "select_split", "split_of"]


def load_task(spec: str, split: str = "eval", n: int | None = None, seed: int = 0, *,
              eval_fraction: float = 0.2, dev_fraction: float = 0.0,
              arithmetic: ArithmeticConfig | None = None) -> list[Record]:
    """Records of a task's split. n=None: all of them (arithmetic: 64); n >= the split's size: all of it. For fixed
    datasets, n < available picks a seeded random subset (in dataset order)."""
    if spec == "arithmetic":
        n, cfg = 64 if n is None else n, arithmetic or ArithmeticConfig()
        if split in ("all", "eval", "dev", "train") and n > 0.5 * cfg.space_size() * (
                1 if split == "all" else cfg.fraction(split)):  # close to the split's size: it is listed anyway
            listed = split_expressions(split, cfg)
            if listed is not None and n > len(listed):
                n = len(listed)  # data.eval_size's "a number >= the split's size: all of it"
        return generate_arithmetic(n, split=split, seed=seed, cfg=arithmetic)
    if spec == "champ":
        recs = load_champ()
    elif spec == "humaneval":
        recs = load_humaneval()
    elif spec.startswith("jsonl:"):
        recs = load_jsonl(spec[len("jsonl:"):])
    else:
        raise ValueError(f"unknown task {spec!r}: use arithmetic, champ, humaneval or jsonl:PATH")
    recs = select_split(recs, split, eval_fraction, dev_fraction=dev_fraction)
    if n is not None and n < len(recs):
        keep = sorted(random.Random(f"{spec}|{split}|{seed}").sample(range(len(recs)), n))
        recs = [recs[i] for i in keep]
    return recs
