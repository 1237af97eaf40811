"""The rollout contract shared by the engine, the HF `generate` baseline, evaluation and training.

A two-turn episode's token layout, exactly as the trainer scores it:

    prompt_ids + turn1_ids + instruction_ids + turn2_ids

- prompt_ids: the chat-templated [user: x] plus the assistant header.
- turn1_ids: the sampled turn-1 tokens, including the EOS that ended it (if one did).
- instruction_ids: everything between y1 and y2: the end-of-turn token(s) the template adds
  after y1 when y1 did not already end with one, the user turn holding the instruction, and the
  assistant header. Token ids, never re-tokenised text.
- turn2_ids: the sampled turn-2 tokens.

With more than two turns (`generate(..., num_turns=K)`), turns 3..K follow in `extra_turns`, each
after its own instruction ids: ... + turn2_ids + extra_turns[0].instruction_ids + extra_turns[0].ids ...
`turn_tokens` / `turn_logprobs` list every turn's tokens in order, whatever the count.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class ExtraTurn:
    """Turn 3 or later: the ids between the previous turn and this one, then this turn's tokens."""
    instruction_ids: list[int]
    ids: list[int]
    logprobs: list[float]
    text: str


@dataclass
class Episode:
    """One sampled episode: a prompt and its turns (two, or K with extra_turns), with their log-probs."""
    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    turn1_ids: list[int]
    turn1_logprobs: list[float]
    turn1_text: str
    finish_reasons: list[str]  # one per turn generated: "eos" | "length" | "stop"
    instruction_ids: list[int] = field(default_factory=list)
    turn2_ids: list[int] | None = None
    turn2_logprobs: list[float] | None = None
    turn2_text: str | None = None
    extra_turns: list[ExtraTurn] = field(default_factory=list)
    # SamplingParams.turn2_n > 1: the index of this turn-2 branch among the samples that share this turn 1
    # (same prompt_index and sample_index, the same turn1_ids; branch 0 draws exactly as an unbranched sample)
    branch_index: int = 0
    # The engine's residual stream after layers [0, prefix_layer) at every position but the last
    # ([len(full_ids()) - 1, d], generate(..., capture_layer=k)): the trainer's frozen prefix, already computed
    # by the sampler with the same frozen weights. None when not captured.
    prefix_hidden: object = None
    prefix_layer: int = 0

    @property
    def turn_tokens(self) -> list[list[int]]:
        """Every generated turn's tokens, in order."""
        rest = [self.turn2_ids] if self.turn2_ids is not None else []
        return [self.turn1_ids, *rest, *(t.ids for t in self.extra_turns)]

    @property
    def turn_texts(self) -> list[str | None]:
        """Every generated turn's decoded text, in order."""
        rest = [self.turn2_text] if self.turn2_ids is not None else []
        return [self.turn1_text, *rest, *(t.text for t in self.extra_turns)]

    @property
    def turn_logprobs(self) -> list[list[float]]:
        rest = [self.turn2_logprobs] if self.turn2_logprobs is not None else []
        return [self.turn1_logprobs, *rest, *(t.logprobs for t in self.extra_turns)]

    def full_ids(self) -> list[int]:
        ids = self.prompt_ids + self.turn1_ids
        if self.turn2_ids is not None:
            ids = ids + self.instruction_ids + self.turn2_ids
        for t in self.extra_turns:
            ids = ids + t.instruction_ids + t.ids
        return ids


@dataclass(kw_only=True)
class SamplingParams:
    """One generate call's sampling. max_new_tokens has no default here: the commands' budget is
    `rollout.max_new_tokens` (score_train.config), resolved per task."""
    max_new_tokens: int  # per turn
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop: tuple[str, ...] = ()
    seed: int = 0
    # two-turn rollouts of the paged engine: each turn 1 is followed by this many turn-2 samples, forked after
    # the instruction (they share its KV blocks) -> n * turn2_n samples per prompt, n distinct turns 1
    turn2_n: int = 1


class Rollout(Protocol):
    """The contract every rollout backend implements fully (the paged engine, the HF baseline, a test's fake):
    callers never inspect signatures or probe attributes."""

    model: object  # the score_train CausalLM sampled (its train/eval mode is the caller's), or None

    def generate(self, prompts: list[str], params: SamplingParams, *, two_turn: bool = True,
                 instruction: str | list[str] | None = None, reply_prefix: str | list[str] = "",
                 num_turns: int | None = None,
                 seeds: list[int] | None = None, progress=None, capture_layer: int = 0) -> list[Episode]:
        """prompts are user messages (sent through the tokenizer's chat template). Returns
        len(prompts) * params.n (* params.turn2_n) samples, ordered by (prompt_index, sample_index, branch_index).

        num_turns: turns per sample (default 2, or 1 with two_turn=False); `instruction` follows each turn but the
        last, and each later reply starts with `reply_prefix` (context, not the turn's text); either may be a list
        with one entry per prompt (an instruction pool's draw), else one string serves every prompt.
        seeds: per-sample seeds (len(prompts) * n), else derived from params.seed.
        progress: called with the number of tokens drawn as they are drawn.
        capture_layer=k > 0: each sample carries `prefix_hidden`, the residual after layers [0, k) of its
        positions but the last (a trainer whose bottom k layers are frozen then skips them)."""
        ...

    def own_dtype(self) -> contextlib.AbstractContextManager:
        """A context in which sampling uses the model's own dtype (the trainer's evaluations)."""
        ...
