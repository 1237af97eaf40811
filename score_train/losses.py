"""The trainer's loss terms as small pure functions over one packed micro-batch.

Shapes: N packed tokens, M <= N policy tokens (turn_ids >= 0), B sequences (cu_seqlens [B+1]), K turns, d hidden.
The per-token work (PG ratio, clipping, the sampled KL estimators, per-turn weights, aggregation) is
`score_kernels.policy_loss`; these functions only pick its inputs and the micro-batch's share of the step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepCounts:
    """The normalisers of one optimisation step, counted over every micro-batch of every rank, so the
    micro-batches' (and ranks') losses sum to the loss of the whole step in one pass."""
    tokens: int  # policy tokens (token-mean)
    seqs: int  # sequences (seq-mean-*)


def selected_logprobs(hidden, weight, targets, sel, temperature: float) -> torch.Tensor:
    """hidden [N, d], weight [V, d], targets [N], sel [N] bool -> [N] fp32 log-probs of the targets at
    `temperature` on the selected rows, 0 elsewhere (the lm_head never runs on the other rows)."""
    from score_kernels import linear_logprobs

    lp = linear_logprobs(hidden[sel], weight, targets[sel], temperature=temperature)  # [M]
    return torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device).masked_scatter(sel, lp.float())


def exact_kl_tokens(hidden, weight, ref_hidden, ref_weight, sel, temperature: float) -> torch.Tensor:
    """[N] fp32 full-vocabulary KL(pi || pi_ref) per selected token at `temperature` (0 elsewhere),
    differentiable in hidden and weight; the reference side is a constant."""
    from score_kernels import linear_kl

    kl = linear_kl(hidden[sel], weight, ref_hidden[sel], ref_weight, temperature=temperature)  # [M]
    return torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device).masked_scatter(sel, kl.float())


def micro_batch_loss(lp, adv, turn_ids, cu_seqlens, counts: StepCounts, *, num_turns: int, kl_coef, agg: str,
                     old_lp=None, ref_lp=None, kl_tokens=None, kl_estimator: str = "k3", clip_eps: float = 0.0):
    """This micro-batch's share of the step loss, and policy_loss's stats.

    lp, adv, turn_ids, old_lp, ref_lp, kl_tokens: [N]; cu_seqlens [B+1]. The KL term is either sampled
    (ref_lp with kl_estimator) or given per token (kl_tokens, the exact KL); kl_coef one weight per turn,
    all zero when there is no reference. token-mean divides by the step's policy tokens; seq-mean-* lets
    the op average over this micro-batch's B sequences and rescales by B / (the step's sequences)."""
    from score_kernels import policy_loss

    kw = {"global_token_count": counts.tokens} if agg == "token-mean" else {}
    scale = 1.0 if agg == "token-mean" else (cu_seqlens.numel() - 1) / max(counts.seqs, 1)
    loss, stats = policy_loss(lp, adv, turn_ids, old_logprobs=old_lp, ref_logprobs=ref_lp, kl_tokens=kl_tokens,
                              kl_coef=list(kl_coef), kl_estimator=kl_estimator, clip_eps=clip_eps or None, agg=agg,
                              cu_seqlens=cu_seqlens, num_turns=num_turns, **kw)
    return loss * scale, stats
