"""Rewards: binary correctness of a response, per task kind.

    reward(task_kind, text, record) -> float    # 1.0 right, 0.0 wrong

- "arithmetic": the last number in the response (a \\boxed{} or "Final Answer" answer wins when present)
  equals the reference as a number.
- "math": extract_answer(text) is_equivalent to record.answer (math-verify, or the fallback).
- "code": the last fenced code block (else the whole text), completed against the record's prompt,
  passes record.tests in the sandbox (check_program).

RewardPool scores batches in worker processes so that a trainer's GPU loop never waits on sympy or
on a sandboxed program.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import Future, ProcessPoolExecutor

from score_train.rewards.code import ExecResult, check_program, code_reward, extract_code
from score_train.rewards.math import (
    arithmetic_answer,
    arithmetic_reward,
    extract_answer,
    is_equivalent,
    math_reward,
    normalize,
    numbers_equal,
    numbers_in,
)

__all__ = ["ExecResult", "RewardPool", "answer_key", "arithmetic_answer", "check_program", "extract_answer",
           "extract_code", "is_equivalent", "reward", "stated_answer", "wrote_answer"]


def _get(record, key):
    return record.get(key) if isinstance(record, dict) else getattr(record, key, None)


def reward(task_kind: str, text: str | None, record, *, code_timeout_s: float = 5.0,
           code_memory_mb: int = 1024) -> float:
    """1.0 if the response text solves the record's problem, else 0.0. record: a data.Record or a dict
    with the same fields (answer; tests, problem, entry_point for code)."""
    if task_kind == "arithmetic":
        return arithmetic_reward(text, str(_get(record, "answer")))
    if task_kind == "math":
        return math_reward(text, str(_get(record, "answer")))
    if task_kind == "code":
        return code_reward(text, _get(record, "tests"), prompt=_get(record, "problem"),
                           entry_point=_get(record, "entry_point"), timeout_s=code_timeout_s,
                           memory_mb=code_memory_mb)
    raise ValueError(f"task_kind must be 'arithmetic', 'math' or 'code', got {task_kind!r}")


def stated_answer(task_kind: str, text: str | None) -> str | None:
    """The answer a response states, read by the same rule as its reward, or None when it states none.

    arithmetic: the \\boxed{} / "Final Answer" number, else the last number (arithmetic_answer);
    math: the \\boxed{} / "Final Answer" answer (extract_answer); code: the program text (the last
    fenced block, else the whole response) when it is not blank.
    Evaluation uses it to tell a wrong answer from no answer at all (a turn cut off before it wrote one).
    """
    if task_kind == "arithmetic":
        return arithmetic_answer(text)
    if task_kind == "math":
        a = extract_answer(text)
        return a if a is not None and a.strip() else None
    if task_kind == "code":
        code = extract_code(text)
        return code if code.strip() else None
    raise ValueError(f"task_kind must be 'arithmetic', 'math' or 'code', got {task_kind!r}")


def wrote_answer(task_kind: str, text: str | None, answer) -> bool:
    """Whether the reference answer is written anywhere in the response as a number (arithmetic, and math
    with a numeric reference), whatever the answer rule then reads as its final answer. A wrong turn 1 that
    wrote the right number and ended on another (its final number an operand, or a second, wrong sum) is not
    a wrong computation that turn 2 fixed: evaluation counts such "corrections" apart. Code: always False."""
    if task_kind == "code" or answer is None:
        return False
    gold = str(answer).strip()
    return any(numbers_equal(x, gold) for x in numbers_in(text))


def answer_key(task_kind: str, text: str | None) -> str | None:
    """The comparable final answer of a response, for majority voting (None: no answer; code has none)."""
    if task_kind == "arithmetic":
        a = arithmetic_answer(text)
        if a is None:
            return None
        try:
            f = float(a)
            return str(int(f)) if f.is_integer() else repr(f)
        except ValueError:
            return a
    if task_kind == "math":
        a = extract_answer(text)
        return normalize(a) if a is not None else None
    return None


def _score_chunk(items):
    return [reward(kind, text, rec, **kw) for kind, text, rec, kw in items]


class RewardPool:
    """Scores (task_kind, text, record) items in worker processes.

    pool.score(items) blocks; pool.submit(items) returns a Future for the list of rewards, so a
    trainer can launch scoring and keep the GPU busy. workers=0 scores in this process.
    """

    def __init__(self, workers: int | None = None, *, chunk: int = 16, **reward_kwargs):
        self.workers = max(1, min(4, (os.cpu_count() or 2) // 2)) if workers is None else workers
        self.chunk = chunk
        self.kw = reward_kwargs
        # spawn: forking a process that holds CUDA or torch threads is unsafe.
        self._ex = (ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
                    if self.workers > 0 else None)

    def _items(self, items):
        return [(k, t, r, self.kw) for k, t, r in items]

    def submit(self, items) -> Future:
        items = self._items(items)
        if self._ex is None:
            f: Future = Future()
            f.set_result(_score_chunk(items))
            return f
        parts = [self._ex.submit(_score_chunk, items[i:i + self.chunk]) for i in range(0, len(items), self.chunk)]
        out: Future = Future()
        remaining = [len(parts)]

        def done(_):
            remaining[0] -= 1
            if remaining[0] == 0:
                try:
                    out.set_result([x for p in parts for x in p.result()])
                except BaseException as e:  # noqa: BLE001
                    out.set_exception(e)

        if not parts:
            out.set_result([])
        for p in parts:
            p.add_done_callback(done)
        return out

    def score(self, items) -> list[float]:
        return self.submit(items).result()

    def close(self):
        if self._ex is not None:
            self._ex.shutdown(wait=True, cancel_futures=True)
            self._ex = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
