"""The engine's state: a prompt group (one prompt, its n samples) and a `Sequence` with a status.

A group starts as one *parent* sequence holding the prompt. Once its prompt is computed it forks
into n samples that share its KV blocks; each sample then generates `num_turns` turns. Between two
turns the instruction ids are appended to the sample's tokens and computed in one extend pass.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from score_train.rollout.block_manager import BlockTable


class Status(enum.Enum):
    WAITING = enum.auto()   # a parent whose group is not admitted yet (its worst case does not fit)
    PREFILL = enum.auto()   # a parent computing the group's prompt; it leaves when the prompt is done
    RUNNING = enum.auto()   # a sample generating turn `Sequence.turn` (possibly extending the instruction first)
    FINISHED = enum.auto()  # a sample whose last turn ended; its blocks are freed


@dataclass(eq=False)
class PromptGroup:
    index: int
    prompt_ids: list[int]
    suffix: list[int]  # what the chat template puts after a turn's content, up to the next assistant header
    seeds: list[int]  # one per sample
    num_turns: int
    reserved_blocks: int = 0  # the group's worst case, held by the scheduler until its last sample finishes
    live: int = 0  # samples not finished yet

    @property
    def n(self) -> int:
        return len(self.seeds)


@dataclass(eq=False)
class Sequence:
    group: PromptGroup
    tokens: list[int]
    num_computed: int = 0
    table: BlockTable = field(default_factory=BlockTable)
    status: Status = Status.WAITING
    sample_index: int = -1  # -1: the group's parent
    seed: int = 0
    turn: int = 0  # 0-based index of the turn being generated
    extend_end: int = 0  # tokens below this index that are instruction ids (for the phase counts)
    out_ids: list[list[int]] = field(default_factory=list)  # per turn
    out_logprobs: list[list[float]] = field(default_factory=list)
    instruction_ids: list[list[int]] = field(default_factory=list)  # between turn t and t+1
    finish_reasons: list[str] = field(default_factory=list)
    captured: list = field(default_factory=list)  # per forward, this sequence's rows of a captured residual

    @property
    def num_pending(self) -> int:
        """Tokens in the sequence whose K/V is not in the cache yet."""
        return len(self.tokens) - self.num_computed

    def fork(self, sample_index: int, table: BlockTable) -> Sequence:
        """A sample of this parent's group, sharing the prompt (and its KV blocks through `table`)."""
        g = self.group
        return Sequence(g, list(self.tokens), self.num_computed, table, Status.RUNNING, sample_index,
                        g.seeds[sample_index], out_ids=[[]], out_logprobs=[[]], captured=list(self.captured))
