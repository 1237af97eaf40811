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


SPLITS = ("train", "dev", "eval")


def split_of(key: str, eval_fraction: float, dev_fraction: float = 0.0) -> str:
    """Deterministic assignment from the problem's identity, so the splits never overlap whatever seed or count
    any side asks for: a hash below eval_fraction is "eval" (the test split), the next dev_fraction of the range is
    "dev" (carved from the train side, for choosing settings: no training run draws it), the rest "train"."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "eval" if h < eval_fraction else "dev" if h < eval_fraction + dev_fraction else "train"


def check_fractions(eval_fraction: float, dev_fraction: float) -> None:
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if not 0.0 <= dev_fraction < 1.0 - eval_fraction:
        raise ValueError(f"dev_fraction must be in [0, 1 - eval_fraction), got {dev_fraction}")


def select_split(records: list[Record], split: str, eval_fraction: float, key=lambda r: r.id, *,
                 dev_fraction: float = 0.0) -> list[Record]:
    if split == "all":
        return list(records)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)} or all, got {split!r}")
    if split == "dev" and not dev_fraction > 0:
        raise ValueError("there is no dev split: dev_fraction is 0 (data.dev_fraction carves it from the train side)")
    return [r for r in records if split_of(key(r), eval_fraction, dev_fraction) == split]
