"""Packing samples into padding-free micro-batches, and per-turn values broadcast to their tokens.

Token convention: position i of a packed sequence predicts token i+1, so `targets[i] = ids[i+1]` and
`turn_ids[i]` is the turn that token i+1 belongs to (-1: prompt, instruction, or sequence end) -- the per-token
turn index the kernels take (`score_kernels.policy_loss`, `token_advantages`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from score_train.rollout.types import Episode


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [N] int64
    position_ids: torch.Tensor  # [N] int64, restarting at 0 in each sequence
    cu_seqlens: torch.Tensor  # [B+1] int32
    targets: torch.Tensor  # [N] int64, next token, -100 where turn_ids < 0
    turn_ids: torch.Tensor  # [N] int64, turn of the target token or -1
    seq_ids: torch.Tensor  # [N] int64, row of the sample in the step's [B, K] tables
    old_logprobs: torch.Tensor  # [N] fp32, the sampler's log-prob of the target (0 off-policy tokens)
    # [N, d] the sampler's residual after layers [0, prefix_layer) (each sequence's last row zero: that position
    # predicts nothing and no other attends to it), when every sample carried one; else None
    prefix_hidden: torch.Tensor | None = None
    prefix_layer: int = 0

    @property
    def num_policy_tokens(self) -> int:
        return int((self.turn_ids >= 0).sum())


def pack_samples(samples: list[Episode], rows: list[int] | None = None) -> PackedBatch:
    """Concatenate the samples' token layouts (prompt + y1 [+ instruction + y2 [+ instruction + y3 ...]])
    without padding. rows[i] is sample i's row index in the step's tables (default: i). A turn-2 branch other
    than the first (branch_index > 0) repeats its sibling's y1: there y1 is context, not policy tokens, so each
    distinct y1 is trained (and KL-penalised) once."""
    rows = list(range(len(samples))) if rows is None else rows
    ids, pos, tgt, tid, sid, olp, cu = [], [], [], [], [], [], [0]
    for s, row in zip(samples, rows):
        parts = [(s.prompt_ids, -1, None), (s.turn1_ids, 0 if s.branch_index == 0 else -1, s.turn1_logprobs)]
        if s.turn2_ids is not None:
            parts += [(s.instruction_ids, -1, None), (s.turn2_ids, 1, s.turn2_logprobs)]
        for k, t in enumerate(s.extra_turns, start=2):
            parts += [(t.instruction_ids, -1, None), (t.ids, k, t.logprobs)]
        seq, turn, lp = [], [], []
        for toks, t, lps in parts:
            seq += list(toks)
            turn += [t] * len(toks)
            lp += list(lps) if lps is not None and len(lps) == len(toks) else [0.0] * len(toks)
        n = len(seq)
        ids += seq
        pos += range(n)
        # shift by one: position i is scored on token i+1
        tid += turn[1:] + [-1]
        tgt += [t if k >= 0 else -100 for t, k in zip(seq[1:] + [0], turn[1:] + [-1])]
        olp += lp[1:] + [0.0]
        sid += [row] * n
        cu.append(cu[-1] + n)
    return PackedBatch(
        prefix_hidden=_packed_prefix(samples), prefix_layer=samples[0].prefix_layer if samples else 0,
        input_ids=torch.tensor(ids, dtype=torch.long),
        position_ids=torch.tensor(pos, dtype=torch.long),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        targets=torch.tensor(tgt, dtype=torch.long),
        turn_ids=torch.tensor(tid, dtype=torch.long),
        seq_ids=torch.tensor(sid, dtype=torch.long),
        old_logprobs=torch.tensor(olp, dtype=torch.float32),
    )


def _packed_prefix(samples: list[Episode]) -> torch.Tensor | None:
    """The samples' captured prefixes packed like their tokens, or None unless all carry one of one layer."""
    if not samples or any(s.prefix_hidden is None or s.prefix_layer != samples[0].prefix_layer for s in samples):
        return None
    parts = []
    for s in samples:
        h = s.prefix_hidden
        if h.shape[0] != len(s.full_ids()) - 1:
            raise ValueError(f"sample ({s.prompt_index}, {s.sample_index}): prefix_hidden has {h.shape[0]} rows, "
                             f"expected len(full_ids()) - 1 = {len(s.full_ids()) - 1}")
        parts += [h, h.new_zeros(1, h.shape[1])]
    return torch.cat(parts)  # outside inference mode: a plain tensor the policy's graph may save


def micro_batches(samples: list[Episode], max_tokens: int) -> list[list[int]]:
    """Split sample indices into consecutive groups of at most max_tokens packed tokens
    (a longer single sample gets its own group). Consecutive keeps a prompt's n samples together."""
    groups, cur, cur_n = [], [], 0
    for i, s in enumerate(samples):
        n = len(s.full_ids())
        if cur and cur_n + n > max_tokens:
            groups.append(cur)
            cur, cur_n = [], 0
        cur.append(i)
        cur_n += n
    if cur:
        groups.append(cur)
    return groups


def token_values(values: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """[B, K] per-turn values -> [N] per-token values of a packed batch (0 where turn_ids < 0)."""
    t = batch.turn_ids
    out = values[batch.seq_ids, t.clamp(min=0)]
    return torch.where(t >= 0, out, torch.zeros_like(out))
