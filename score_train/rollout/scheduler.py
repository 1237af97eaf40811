"""Which sequences run in the next forward, and what happens to them after it.

Prompt groups are admitted whole, and only while their worst case fits in the KV pool (so no
sequence ever has to be preempted); a group's reservation is released when its last sample
finishes. Each step takes every decode token first, then prefill / extend chunks with the rest of
the token budget.
"""
from __future__ import annotations

from collections import deque

from score_train.prompts import ChatFormat
from score_train.rollout.block_manager import BlockManager
from score_train.rollout.sequence import PromptGroup, Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_batch_tokens: int, max_num_seqs: int,
                 eos_ids: set[int], max_new_tokens: int, stop_hit=None):
        self.bm = block_manager
        self.max_batch_tokens, self.max_num_seqs = max_batch_tokens, max_num_seqs
        self.eos_ids, self.max_new_tokens, self.stop_hit = eos_ids, max_new_tokens, stop_hit
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.finished: list[Sequence] = []
        self.reserved = 0

    def add(self, group: PromptGroup) -> None:
        self.waiting.append(Sequence(group, list(group.prompt_ids)))

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def _admit(self) -> None:
        while self.waiting:
            g = self.waiting[0].group
            fits = self.reserved + g.reserved_blocks <= self.bm.num_blocks
            room = len(self.running) + g.max_live <= max(self.max_num_seqs, g.max_live)
            if not (fits and room):
                return
            parent = self.waiting.popleft()
            parent.status = Status.PREFILL
            self.reserved += g.reserved_blocks
            self.running.append(parent)

    def schedule(self) -> tuple[list[Sequence], list[int]]:
        """The next forward: the sequences and how many of each one's pending tokens it computes."""
        self._admit()
        # decode tokens first (one each), then prefill / extend chunks with the remaining budget
        self.running.sort(key=lambda s: s.num_pending > 1)
        budget = self.max_batch_tokens
        seqs, takes = [], []
        for s in self.running:
            take = min(s.num_pending, budget)
            if take <= 0:
                break
            seqs.append(s)
            takes.append(take)
            budget -= take
        return seqs, takes

    def postprocess(self, seqs: list[Sequence], tokens: list[int], logprobs: list[float]) -> None:
        """Append the drawn tokens (a parent's n draws go to its n new samples, a branch point's m draws to its
        m turn-2 branches), end the turns that stop and retire the samples whose last turn ended."""
        k = 0
        for s in seqs:
            for c in self._forks(s):
                self._append(c, tokens[k], logprobs[k])
                k += 1
        keep = []
        for s in self.running:
            if s.status is Status.FINISHED:
                g = s.group
                g.live -= 1
                if g.live == 0:
                    self.reserved -= g.reserved_blocks
            elif s.status is not Status.FORKED:
                keep.append(s)
        self.running = keep

    def _forks(self, s: Sequence) -> list[Sequence]:
        """The sequences that take the draws of s's logits row: s itself, or the forks that replace it (sharing
        its blocks; s leaves as FORKED)."""
        g = s.group
        if s.status is Status.PREFILL:
            kids = [s.fork(j, t) for j, t in enumerate(self.bm.fork(s.table, g.n))]
            g.live += g.n
        elif s.at_branch_point:
            kids = [s.branch(j, t) for j, t in enumerate(self.bm.fork(s.table, len(g.branch_seeds[s.sample_index])))]
            g.live += len(kids) - 1  # s, counted live since its group's prefill, is replaced by its branches
        else:
            return [s]
        self.bm.free(s.table)
        s.status = Status.FORKED
        self.running += kids
        return kids

    def _append(self, s: Sequence, tok: int, lp: float) -> None:
        s.tokens.append(tok)
        out = s.out_ids[s.turn]
        out.append(tok)
        s.out_logprobs[s.turn].append(lp)
        if tok in self.eos_ids:
            reason = "eos"
        elif self.stop_hit is not None and self.stop_hit(out):
            reason = "stop"
        elif len(out) >= self.max_new_tokens:
            reason = "length"
        else:
            return
        s.finish_reasons.append(reason)
        if s.turn + 1 < s.group.num_turns:
            # the next turn starts with the instruction ids, computed by one extend pass
            instr = ChatFormat.instruction_ids(s.group.suffix, out, self.eos_ids)
            s.instruction_ids.append(instr)
            s.tokens += instr
            s.extend_end = len(s.tokens)
            s.turn += 1
            s.out_ids.append([])
            s.out_logprobs.append([])
            return
        s.status = Status.FINISHED
        self.bm.free(s.table)
        self.finished.append(s)

