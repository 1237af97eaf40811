"""JSONL task files, one record a line:

- MATH format: {"problem", "solution"} (the answer is the last \\boxed{...} in the solution) or
  {"problem", "answer"};
- MBPP/HumanEval format: {"prompt", "test", "entry_point"} (`test` defines check(candidate)).

An optional "id" field names the record (default: file name and line). Any malformed line raises
JsonlFormatError whose message starts with "FILE:LINE:".
"""
from __future__ import annotations

import json
import os

from score_train.data.humaneval import code_tests
from score_train.data.records import Record
from score_train.rewards.math import last_boxed


class JsonlFormatError(ValueError):
    def __init__(self, path: str, line: int, msg: str):
        super().__init__(f"{path}:{line}: {msg}")
        self.path, self.line = path, line


def _str_field(obj: dict, key: str, path: str, line: int) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or not v.strip():
        raise JsonlFormatError(path, line, f"field {key!r} must be a non-empty string, got {v!r}")
    return v


def parse_record(obj, path: str, line: int) -> Record:
    if not isinstance(obj, dict):
        raise JsonlFormatError(path, line, f"expected a JSON object, got {type(obj).__name__}")
    rid = str(obj.get("id", obj.get("task_id", f"{os.path.basename(path)}:{line}")))
    if "problem" in obj:
        problem = _str_field(obj, "problem", path, line)
        if "answer" in obj:
            answer = obj["answer"]
            if isinstance(answer, (int, float)) and not isinstance(answer, bool):
                answer = str(answer)
            if not isinstance(answer, str) or not answer.strip():
                raise JsonlFormatError(path, line, f"field 'answer' must be a non-empty string, got {answer!r}")
        elif "solution" in obj:
            answer = last_boxed(_str_field(obj, "solution", path, line))
            if not answer:
                raise JsonlFormatError(path, line, "field 'solution' has no \\boxed{...} answer")
        else:
            raise JsonlFormatError(path, line, "a MATH record needs 'answer' or 'solution' besides 'problem'")
        return Record(id=rid, kind="math", problem=problem, answer=answer, source=f"jsonl:{path}")
    if "prompt" in obj or "test" in obj or "entry_point" in obj:
        prompt = _str_field(obj, "prompt", path, line)
        test = _str_field(obj, "test", path, line)
        entry = _str_field(obj, "entry_point", path, line)
        if not entry.isidentifier():
            raise JsonlFormatError(path, line, f"field 'entry_point' must be a Python identifier, got {entry!r}")
        return Record(id=rid, kind="code", problem=prompt, tests=code_tests(test, entry), entry_point=entry,
                      source=f"jsonl:{path}")
    raise JsonlFormatError(path, line, "unknown record format: expected 'problem' (MATH) or "
                                       "'prompt'/'test'/'entry_point' (MBPP/HumanEval) fields")


def load_jsonl(path: str) -> list[Record]:
    out = []
    with open(path, encoding="utf-8") as f:
        for i, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise JsonlFormatError(path, i, f"invalid JSON: {e.msg} (column {e.colno})") from None
            out.append(parse_record(obj, path, i))
    if not out:
        raise ValueError(f"{path}: no records")
    return out
