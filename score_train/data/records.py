"""The one record type every task source produces."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

KINDS = ("arithmetic", "math", "code")


@dataclass
class Record:
    """One problem.

    kind: "arithmetic" (answer read leniently: the last number), "math" (extract_answer + is_equivalent)
    or "code" (the program must pass `tests`).
    problem: the question as the model should see it (before any prompt template), for code the
    HumanEval-style prompt (signature + docstring).
    answer: reference final answer (arithmetic, math). tests/entry_point: for code.
    """
    id: str
    kind: str
    problem: str
    answer: str | None = None
    tests: str | None = None
    entry_point: str | None = None
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "code" and not self.tests:
            raise ValueError(f"record {self.id!r}: a code record needs tests")
        if self.kind != "code" and (self.answer is None or str(self.answer).strip() == ""):
            raise ValueError(f"record {self.id!r}: a {self.kind} record needs an answer")


def split_of(key: str, eval_fraction: float) -> str:
    """Deterministic held-out assignment from the problem's identity, so train and eval never overlap
    whatever seed or count either side asks for."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "eval" if h < eval_fraction else "train"


def select_split(records: list[Record], split: str, eval_fraction: float, key=lambda r: r.id) -> list[Record]:
    if split == "all":
        return list(records)
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
    return [r for r in records if split_of(key(r), eval_fraction) == split]
