"""The engine's state: a prompt group (one prompt, its n samples) and a `Sequence` with a status.

A group starts as one *parent* sequence holding the prompt. Once its prompt is computed it forks
into n samples that share its KV blocks; each sample then generates `num_turns` turns. Between two
turns the instruction ids are appended to the sample's tokens and computed in one extend pass. With
`turn2_n` = m > 1 a sample forks again once that instruction is computed: m turn-2 branches share its
prompt, turn 1 and instruction blocks, each drawing its first token from the same logits row.
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
    FORKED = enum.auto()    # a parent (or a sample at its turn-2 branch point) replaced by its forks, which hold
    #                         its blocks; not an output


@dataclass(eq=False)
class PromptGroup:
    index: int
    prompt_ids: list[int]
    suffix: list[int]  # what the chat template puts after a turn's content, up to the next assistant header
    seeds: list[int]  # one per sample
    num_turns: int
    # per sample, its turn-2 branches' seeds (len m each; branch 0's is the sample's own seed); [] = no branching
    branch_seeds: list[list[int]] = field(default_factory=list)
    reserved_blocks: int = 0  # the group's worst case, held by the scheduler until its last sample finishes
    live: int = 0  # samples not finished yet

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def max_live(self) -> int:
        """The most sequences the group holds at once: n samples, each of which may become m turn-2 branches."""
        return self.n * (len(self.branch_seeds[0]) if self.branch_seeds else 1)


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
    branch_index: int = 0  # which turn-2 branch of its sample (PromptGroup.branch_seeds)
    out_ids: list[list[int]] = field(default_factory=list)  # per turn
    out_logprobs: list[list[float]] = field(default_factory=list)
    instruction_ids: list[list[int]] = field(default_factory=list)  # between turn t and t+1
    finish_reasons: list[str] = field(default_factory=list)
    captured: list = field(default_factory=list)  # per forward, this sequence's rows of a captured residual

    @property
    def num_pending(self) -> int:
        """Tokens in the sequence whose K/V is not in the cache yet."""
        return len(self.tokens) - self.num_computed

    @property
    def at_branch_point(self) -> bool:
        """A sample about to draw turn 2's first token whose group branches turn 2."""
        return (self.status is Status.RUNNING and self.turn == 1 and not self.out_ids[1]
                and bool(self.group.branch_seeds))

    def draw_seeds(self) -> list[int]:
        """The seeds of the draws this sequence's next logits row feeds: the group's n samples for a parent,
        the m branches at a turn-2 branch point, else its own."""
        if self.status is Status.PREFILL:
            return self.group.seeds
        if self.at_branch_point:
            return self.group.branch_seeds[self.sample_index]
        return [self.seed]

    def fork(self, sample_index: int, table: BlockTable) -> Sequence:
        """A sample of this parent's group, sharing the prompt (and its KV blocks through `table`)."""
        g = self.group
        return Sequence(g, list(self.tokens), self.num_computed, table, Status.RUNNING, sample_index,
                        g.seeds[sample_index], out_ids=[[]], out_logprobs=[[]], captured=list(self.captured))

    def branch(self, branch_index: int, table: BlockTable) -> Sequence:
        """Turn-2 branch `branch_index` of this sample: its tokens so far (and their KV blocks through `table`)."""
        return Sequence(self.group, list(self.tokens), self.num_computed, table, Status.RUNNING, self.sample_index,
                        self.group.branch_seeds[self.sample_index][branch_index], turn=self.turn,
                        extend_end=self.extend_end, branch_index=branch_index,
                        out_ids=[list(t) for t in self.out_ids], out_logprobs=[list(t) for t in self.out_logprobs],
                        instruction_ids=[list(t) for t in self.instruction_ids],
                        finish_reasons=list(self.finish_reasons), captured=list(self.captured))
