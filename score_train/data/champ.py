"""CHAMP competition math (270 problems) from the installed `champ-dataset` package."""
from __future__ import annotations

from score_train.data.records import Record


def load_champ(version: str = "v0") -> list[Record]:
    try:
        import champ_dataset
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the champ task needs the `champ-dataset` package (pip install champ-dataset)") from e
    ds = champ_dataset.load(version)
    out = []
    for pid, p in ds.problems.items():
        out.append(Record(id=f"champ:{pid}", kind="math", problem=p.text, answer=p.answer, source="champ",
                          meta={"category": getattr(p, "category", None)}))
    return out
