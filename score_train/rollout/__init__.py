"""Rollout backends behind one contract (`Rollout`): the paged two-turn engine and the HF `generate` baseline."""
from __future__ import annotations

from score_train.rollout.engine import Engine
from score_train.rollout.hf_baseline import HFRollout
from score_train.rollout.types import Episode, ExtraTurn, Rollout, SamplingParams

__all__ = ["Engine", "ExtraTurn", "HFRollout", "Rollout", "SamplingParams", "Episode", "make_rollout"]

ENGINES = ("engine", "hf")


def make_rollout(model, tokenizer, *, engine: str = "engine", compute_dtype=None, batch_size: int = 64) -> Rollout:
    """The rollout backend for a loaded model: "engine" (paged, prefix-shared; compute_dtype: sample with a copy of
    the weights in this dtype) or "hf" (transformers `generate`, batch_size sequences a call)."""
    if engine == "engine":
        return Engine(model, tokenizer, compute_dtype=compute_dtype)
    if engine == "hf":
        if compute_dtype is not None:
            raise ValueError("compute_dtype needs engine='engine' (the HF baseline samples the model as it is)")
        return HFRollout(model, tokenizer, batch_size=batch_size)
    raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
