"""Generated arithmetic problems with difficulty knobs.

Each distinct expression belongs to exactly one split, chosen by a hash of its text, so train and eval
never share a problem whatever the seeds and counts are. Expressions are evaluated with Python's usual
precedence; answers are integers (division is not offered, so they always are).
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass

from score_train.data.records import SPLITS, Record, check_fractions, split_of

# "Answer with just the number": the embedded model's turn-1 answers then end by themselves within the task's token
# budget, and two-turn evaluations run faster (experiments/self-correction/REPORT.md, "The preset, knob by knob").
DEFAULT_FORMAT = "What is {expr}? Answer with just the number."
OPS = ("+", "-", "*")
OPERAND_NAMES = "abcdefgh"  # prompt_format's operand fields: "{a}" is the first operand, "{b}" the second, ...


def format_fields(prompt_format: str, n_operands: int) -> str | None:
    """Why `prompt_format` cannot phrase a problem of n_operands operands, or None when it can: it must hold
    "{expr}" (the whole expression) or every operand field "{a}", "{b}", ... and no other field."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(prompt_format) if f is not None}
    except ValueError as e:
        return f"prompt_format is not a format string ({e})"
    operands = set(OPERAND_NAMES[:n_operands])
    unknown = fields - operands - {"expr"}
    if unknown:
        return (f"prompt_format has unknown field(s) {', '.join('{' + f + '}' for f in sorted(unknown))}; it takes "
                f"{{expr}} or the operands {', '.join('{' + f + '}' for f in sorted(operands))}")
    if "expr" not in fields and not operands <= fields:
        return ("prompt_format must contain '{expr}' or every operand "
                f"({', '.join('{' + f + '}' for f in sorted(operands))})")
    return None


@dataclass(frozen=True)
class ArithmeticConfig:
    digits: int = 2  # each operand has exactly this many digits (1 digit: 0..9)
    n_operands: int = 2
    operand_digits: tuple[int, ...] = ()  # per operand, in order (e.g. (2, 1): "37 + 5"); () = digits for each
    ops: tuple[str, ...] = ("+",)
    prompt_format: str = DEFAULT_FORMAT  # "{expr}" becomes e.g. "37 + 45"; or the operands "{a}", "{b}", ...
    eval_fraction: float = 0.1
    dev_fraction: float = 0.0  # > 0: a dev split of this fraction of the problems, carved from the train side

    def __post_init__(self):
        if self.digits < 1:
            raise ValueError(f"digits must be >= 1, got {self.digits}")
        if self.n_operands < 2:
            raise ValueError(f"n_operands must be >= 2, got {self.n_operands}")
        if not self.ops or any(o not in OPS for o in self.ops):
            raise ValueError(f"ops must be a non-empty subset of {OPS}, got {self.ops!r}")
        if self.operand_digits and (len(self.operand_digits) != self.n_operands
                                    or any(d < 1 for d in self.operand_digits)):
            raise ValueError(f"operand_digits must give n_operands={self.n_operands} digit counts, each >= 1; "
                             f"got {self.operand_digits}")
        if self.n_operands > len(OPERAND_NAMES):
            raise ValueError(f"n_operands must be <= {len(OPERAND_NAMES)}, got {self.n_operands}")
        why = format_fields(self.prompt_format, self.n_operands)
        if why:
            raise ValueError(why)
        check_fractions(self.eval_fraction, self.dev_fraction)

    def fraction(self, split: str) -> float:
        """The share of all problems that `split` holds."""
        return {"eval": self.eval_fraction, "dev": self.dev_fraction,
                "train": 1 - self.eval_fraction - self.dev_fraction}[split]

    def split(self, expr: str) -> str:
        return split_of("arith:" + expr, self.eval_fraction, self.dev_fraction)

    def space_size(self) -> int:
        size = len(self.ops) ** (self.n_operands - 1)
        for lo, hi in self._ranges():
            size *= hi - lo + 1
        return size

    def _ranges(self) -> list[tuple[int, int]]:
        """Each operand's (lowest, highest) value."""
        return [(0 if d == 1 else 10 ** (d - 1), 10**d - 1)
                for d in (self.operand_digits or (self.digits,) * self.n_operands)]


def _expr(rng: random.Random, cfg: ArithmeticConfig) -> str:
    (lo, hi), *rest = cfg._ranges()
    parts = [str(rng.randint(lo, hi))]
    for lo, hi in rest:
        parts += [rng.choice(cfg.ops), str(rng.randint(lo, hi))]
    return " ".join(parts)


def _value(expr: str) -> int:
    # Only digits, spaces and + - * reach here (built above), so eval of the literal is safe.
    return int(eval(expr, {"__builtins__": {}}, {}))  # noqa: S307


def generate(n: int, split: str = "train", seed: int = 0, cfg: ArithmeticConfig | None = None) -> list[Record]:
    """n distinct problems of the split ("train", "dev" or "eval"; "all": every split, for problems no run of this
    config trains on, e.g. another operand size than training's), reproducible from seed."""
    cfg = cfg or ArithmeticConfig()
    if split == "all":
        return _drawn_from_split(n, split, random.Random(f"arith|{split}|{seed}"), cfg)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)} or all, got {split!r}")
    if split == "dev" and not cfg.dev_fraction > 0:
        raise ValueError("there is no dev split: dev_fraction is 0 (data.dev_fraction carves it from the train side)")
    expected = cfg.space_size() * cfg.fraction(split)
    rng = random.Random(f"arith|{split}|{seed}")
    if n > 0.5 * expected:
        # Rejection sampling would crawl close to the split's size: list the split and draw from it.
        return _drawn_from_split(n, split, rng, cfg)
    seen: set[str] = set()
    out: list[Record] = []
    while len(out) < n:
        expr = _expr(rng, cfg)
        if expr in seen or cfg.split(expr) != split:
            continue
        seen.add(expr)
        out.append(_record(expr, cfg))
    return out


_ENUMERATE_LIMIT = 2_000_000  # expressions; beyond this a split is never close to full at sane n


def _record(expr: str, cfg: ArithmeticConfig) -> Record:
    operands = dict(zip(OPERAND_NAMES, expr.split(" ")[::2]))
    return Record(id=f"arith:{expr}", kind="arithmetic", problem=cfg.prompt_format.format(expr=expr, **operands),
                  answer=str(_value(expr)), source="arithmetic", meta={"expr": expr})


def split_expressions(split: str, cfg: ArithmeticConfig) -> list[str] | None:
    """Every expression of the split ("all": of every split), in a fixed order; None when the space is too big to list (such a split is
    never close to full at a sane n)."""
    if cfg.space_size() > _ENUMERATE_LIMIT:
        return None
    (lo, hi), *rest = cfg._ranges()
    exprs = [str(a) for a in range(lo, hi + 1)]
    for lo, hi in rest:
        exprs = [f"{e} {op} {b}" for e in exprs for op in cfg.ops for b in range(lo, hi + 1)]
    return exprs if split == "all" else [e for e in exprs if cfg.split(e) == split]


def _drawn_from_split(n: int, split: str, rng: random.Random, cfg: ArithmeticConfig) -> list[Record]:
    exprs = split_expressions(split, cfg)
    if exprs is None:
        raise ValueError(f"n={n} is too many to draw from this config's {split} split; raise digits or n_operands")
    if n > len(exprs):
        raise ValueError(f"n={n} is too many for this config's {split} split ({len(exprs)} distinct problems); "
                         "raise digits or n_operands")
    return [_record(e, cfg) for e in rng.sample(exprs, n)]
