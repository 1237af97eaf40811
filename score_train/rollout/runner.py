"""One engine step on the model: pack the scheduled tokens, run the paged forward, sample.

The runner owns the KV cache. `run` computes each scheduled sequence's next `take` tokens (a
prefill chunk, the instruction extend or one decode token, freely mixed) in one forward and returns
the logits of the sequences whose tokens are then all computed: those draw their next token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from score_train.model import PagedBatch
from score_train.rollout.block_manager import BlockManager
from score_train.rollout.sequence import Sequence
from score_train.rollout.types import SamplingParams


@dataclass
class StepOutput:
    logits: torch.Tensor | None  # [R, V] float32, one row per sequence in `ready`
    ready: list[Sequence]  # sequences whose tokens are all computed, in batch order
    context_tokens: int  # cache tokens the step attended over (for the roofline report)


class ModelRunner:
    def __init__(self, model, block_size: int):
        self.model, self.block_size = model, block_size
        self.caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = 0

    def ensure_pool(self, blocks: int, dtype: torch.dtype) -> None:
        """A KV pool of at least `blocks` blocks per layer in `dtype` (kept between calls when it fits)."""
        if self.caches and self.num_blocks >= blocks and self.caches[0][0].dtype == dtype:
            return
        m = self.model
        self.caches = []  # release the old pool before allocating the new one
        shape = (blocks, self.block_size, m.num_kv_heads, m.head_dim)
        self.caches = [(torch.zeros(shape, dtype=dtype, device=m.device),
                        torch.zeros(shape, dtype=dtype, device=m.device)) for _ in range(m.num_layers)]
        self.num_blocks = blocks

    def prepare(self, seqs: list[Sequence], takes: list[int], bm: BlockManager):
        """The packed inputs of one forward; advances each sequence's `num_computed`."""
        ids, pos, slots, copies, tables, ctx, cu = [], [], [], [], [], [], [0]
        for s, take in zip(seqs, takes):
            a = s.num_computed
            ids += s.tokens[a:a + take]
            pos += range(a, a + take)
            sl, cp = bm.append(s.table, take)
            slots += sl
            copies += cp
            s.num_computed = a + take
            tables.append(s.table.blocks)
            ctx.append(s.num_computed)
            cu.append(cu[-1] + take)
        dev = self.model.device
        if copies:  # copy-on-write of shared tail blocks, before this step writes into them
            from score_kernels import copy_blocks
            bmap = torch.tensor(copies, dtype=torch.int64, device=dev)
            for kc, vc in self.caches:
                copy_blocks(kc, vc, bmap)
        width = max(len(t) for t in tables)
        bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev)
        batch = PagedBatch(torch.tensor(slots, dtype=torch.int64, device=dev), bt,
                           torch.tensor(ctx, dtype=torch.int32, device=dev),
                           torch.tensor(cu, dtype=torch.int32, device=dev), self.block_size, self.model.scale,
                           q_lens=takes, ctx_lens=ctx)
        return (torch.tensor(ids, dtype=torch.int64, device=dev), torch.tensor(pos, dtype=torch.int64, device=dev),
                batch, cu, sum(ctx))

    def run(self, seqs: list[Sequence], takes: list[int], bm: BlockManager, *, capture_layer: int = 0) -> StepOutput:
        """capture_layer=k > 0 appends each sequence's rows of the residual after layers [0, k) to its
        `captured` (the trainer's frozen prefix, kept so that training need not recompute it)."""
        ids, pos, batch, cu, ctx_tokens = self.prepare(seqs, takes, bm)
        if capture_layer:
            hidden, residual = self.model.forward_paged(ids, pos, self.caches, batch, capture_layer=capture_layer)
            for i, s in enumerate(seqs):
                s.captured.append(residual[cu[i]:cu[i + 1]])
        else:
            hidden = self.model.forward_paged(ids, pos, self.caches, batch)
        last = [cu[i + 1] - 1 for i, s in enumerate(seqs) if s.num_pending == 0]
        ready = [s for s in seqs if s.num_pending == 0]
        logits = None
        if last:
            rows = hidden[torch.tensor(last, device=hidden.device)] if len(last) < hidden.shape[0] else hidden
            logits = self.model.logits(rows).float()
        return StepOutput(logits, ready, ctx_tokens)

    @staticmethod
    def sample(out: StepOutput, params: SamplingParams) -> tuple[list[int], list[float]]:
        """One draw per ready sample, n per ready parent (its samples' first tokens, from one logits row), m per
        sample at its turn-2 branch point.
        Each draw depends only on (seed, position, logits): the same alone or in any batch."""
        from score_kernels import sample
        if out.logits is None:
            return [], []
        rows, seeds, positions = [], [], []
        for r, s in enumerate(out.ready):
            sd = s.draw_seeds()  # a parent's n samples, a turn-2 branch point's m branches, or its own
            rows += [r] * len(sd)
            seeds += sd
            positions += [len(s.tokens)] * len(sd)
        logits, dev, b = out.logits, out.logits.device, len(rows)
        if rows != list(range(logits.shape[0])):
            logits = logits[torch.tensor(rows, device=dev)]
        temp = torch.full((b,), float(params.temperature), device=dev)
        top_p = torch.full((b,), float(params.top_p), device=dev) if params.top_p < 1.0 else None
        top_k = torch.full((b,), int(params.top_k), device=dev, dtype=torch.int64) if params.top_k > 0 else None
        toks, lps = sample(logits, temperature=temp, top_p=top_p, top_k=top_k,
                           seeds=torch.tensor(seeds, dtype=torch.int64, device=dev),
                           positions=torch.tensor(positions, dtype=torch.int64, device=dev))
        return toks.tolist(), lps.tolist()
