"""Turn-level advantages for multi-turn RL (SCoRe): per-turn rewards -> per-turn advantages ->
per-token advantages.

turn_advantages(rewards [B, K], group_ids [B]) -> [B, K] float32
    Shaping first (SCoRe Stage II bonus): r'_0 = r_0, r'_k = r_k + shaping_alpha * (r_k - r_{k-1}).
    Then per turn k, over the samples that share a group id (ids need not be sorted or contiguous):
      "rloo":      A = r' - mean of r' over the *other* members (a group of one has baseline 0)
      "grpo":      A = r' - group mean; std_normalize divides by (unbiased group std + eps),
                   a group of one has std 1
      "reinforce": A = r' - batch mean of turn k (std_normalize: batch std)
      "none":      A = r'
token_advantages(turn_values [B, K], turn_ids [B, T] or packed [N] + cu_seqlens [B+1]) -> float32
    out = turn_values[b, turn_ids] where 0 <= turn_id < K, else 0 (prompt, instruction, padding).

Layers: compiled CUDA kernels (a hash-table group reduction in global memory, no host sync) and
CPU kernels (csrc/), the PyTorch reference, and torch.library ops. No gradients: rewards are data.
"""
from __future__ import annotations

import math

import torch

from score_kernels import _checks
from score_kernels._backend import pick_backend

ESTIMATORS = ("rloo", "grpo", "reinforce", "none")  # index = csrc/common/adv_math.h AdvEstimator
_SUPPORTED = ("cuda", "cpu", "torch")
_EXT_OPS_TURN = ("turn_advantages",)
_EXT_OPS_TOKEN = ("token_advantages",)


# ----------------------------------------------------------------------------- references
def shape_rewards(rewards: torch.Tensor, shaping_alpha: float) -> torch.Tensor:
    """r'_0 = r_0, r'_k = r_k + alpha * (r_k - r_{k-1})."""
    if shaping_alpha == 0.0 or rewards.shape[1] < 2:
        return rewards
    out = rewards.clone()
    out[:, 1:] = rewards[:, 1:] + shaping_alpha * (rewards[:, 1:] - rewards[:, :-1])
    return out


def turn_advantages_reference(rewards: torch.Tensor, group_ids: torch.Tensor, estimator: str = "rloo",
                              shaping_alpha: float = 0.0, std_normalize: bool = False,
                              eps: float = 1e-6) -> torch.Tensor:
    """Pure PyTorch (float64 math, float32 result). torch.unique reads the ids on the host."""
    r = shape_rewards(rewards.double(), shaping_alpha)
    B, K = r.shape
    if estimator == "none":
        return r.float()
    if estimator == "reinforce":
        inv = torch.zeros(B, dtype=torch.long, device=r.device)
        G = 1
    else:
        _, inv = torch.unique(group_ids, return_inverse=True)
        G = int(inv.max()) + 1 if B else 0
    n = torch.zeros(G, dtype=torch.float64, device=r.device).index_add_(0, inv, torch.ones_like(r[:, 0]))
    s = torch.zeros(G, K, dtype=torch.float64, device=r.device).index_add_(0, inv, r)
    n_i, s_i = n[inv].unsqueeze(1), s[inv]
    if estimator == "rloo":
        base = torch.where(n_i > 1, (s_i - r) / (n_i - 1).clamp_min(1), torch.zeros_like(r))
        return (r - base).float()
    a = r - s_i / n_i
    if std_normalize:
        m2 = torch.zeros(G, K, dtype=torch.float64, device=r.device).index_add_(0, inv, a * a)[inv]
        sd = torch.where(n_i > 1, (m2 / (n_i - 1).clamp_min(1)).sqrt(), torch.ones_like(r))
        a = a / (sd + eps)
    return a.float()


def token_advantages_reference(turn_values: torch.Tensor, turn_ids: torch.Tensor,
                               cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Pure PyTorch: turn_values[b, turn_ids[b, t]] where 0 <= id < K, else 0."""
    K = turn_values.shape[1]
    ids = turn_ids.long()
    valid = (ids >= 0) & (ids < K)
    safe = torch.where(valid, ids, torch.zeros_like(ids))
    vals = turn_values.float()
    if cu_seqlens is None:
        got = torch.gather(vals, 1, safe)
    else:
        got = vals[_checks.row_index(cu_seqlens.long(), ids.shape[0]), safe]
    return torch.where(valid, got, torch.zeros_like(got))


# ----------------------------------------------------------------------------- torch.library
@torch.library.custom_op("score::turn_advantages", mutates_args=())
def _turn_adv_op(rewards: torch.Tensor, group_ids: torch.Tensor, estimator: int, shaping_alpha: float,
                 std_normalize: bool, eps: float, backend: str) -> torch.Tensor:
    if backend in ("cuda", "cpu"):
        return torch.ops.score_ext.turn_advantages(rewards, group_ids, estimator, shaping_alpha, std_normalize, eps)
    return turn_advantages_reference(rewards, group_ids, ESTIMATORS[estimator], shaping_alpha, std_normalize, eps)


@_turn_adv_op.register_fake
def _(rewards, group_ids, estimator, shaping_alpha, std_normalize, eps, backend):
    return torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)


@torch.library.custom_op("score::token_advantages", mutates_args=())
def _token_adv_op(turn_values: torch.Tensor, turn_ids: torch.Tensor, cu_seqlens: torch.Tensor | None,
                  backend: str) -> torch.Tensor:
    if backend in ("cuda", "cpu"):
        return torch.ops.score_ext.token_advantages(turn_values, turn_ids, cu_seqlens)
    return token_advantages_reference(turn_values, turn_ids, cu_seqlens)


@_token_adv_op.register_fake
def _(turn_values, turn_ids, cu_seqlens, backend):
    return torch.empty(turn_ids.shape, dtype=torch.float32, device=turn_ids.device)


# ----------------------------------------------------------------------------- public API
def turn_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, estimator: str = "rloo",
                    shaping_alpha: float = 0.0, std_normalize: bool = False, eps: float = 1e-6,
                    validate: bool | None = None, backend: str | None = None) -> torch.Tensor:
    """Per-turn advantages [B, K] float32 from per-turn rewards [B, K] and group ids [B].

    validate: reject NaN/inf rewards. None (default) checks CPU tensors only, since on a GPU the
    check is a host sync; True forces it.
    backend: None picks cuda ext -> cpu ext -> torch; or force one.
    """
    _checks.tensor("rewards", rewards, floating=True, ndim=2)
    _checks.tensor("group_ids", group_ids, integer=True, ndim=1)
    _checks.same_device("group_ids", group_ids, "rewards", rewards)
    if group_ids.shape[0] != rewards.shape[0]:
        raise ValueError(f"group_ids has B={group_ids.shape[0]} but rewards has B={rewards.shape[0]}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if std_normalize and estimator not in ("grpo", "reinforce"):
        raise ValueError(f"std_normalize applies to 'grpo' and 'reinforce', not estimator={estimator!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    shaping_alpha = float(shaping_alpha)
    if not math.isfinite(shaping_alpha):
        raise ValueError(f"shaping_alpha must be finite, got {shaping_alpha}")
    if _checks.should_validate(validate, rewards.device) and not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contains NaN or inf")
    b = pick_backend(backend, rewards.device, supported=_SUPPORTED, ext_ops=_EXT_OPS_TURN, op="turn_advantages")
    return _turn_adv_op(rewards, group_ids, ESTIMATORS.index(estimator), shaping_alpha, bool(std_normalize),
                        float(eps), b)


def token_advantages(turn_values: torch.Tensor, turn_ids: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                     validate: bool | None = None, backend: str | None = None) -> torch.Tensor:
    """Broadcast per-turn values [B, K] to tokens: [B, T] (or packed [N] with cu_seqlens [B+1]),
    float32, 0 where turn_ids < 0. validate rejects turn ids >= K and bad cu_seqlens (None: CPU
    tensors only, a GPU check is a host sync); unchecked turn ids >= K give 0."""
    _checks.tensor("turn_values", turn_values, floating=True, ndim=2)
    _checks.tensor("turn_ids", turn_ids, integer=True, ndim=(1, 2))
    _checks.same_device("turn_ids", turn_ids, "turn_values", turn_values)
    B, K = turn_values.shape
    if cu_seqlens is None:
        if turn_ids.dim() != 2:
            raise ValueError(f"turn_ids must be [B, T] (or [N] with cu_seqlens), got shape {tuple(turn_ids.shape)}")
        if turn_ids.shape[0] != B:
            raise ValueError(f"turn_ids has B={turn_ids.shape[0]} but turn_values has B={B}")
    else:
        _checks.tensor("cu_seqlens", cu_seqlens, integer=True, ndim=1)
        _checks.same_device("cu_seqlens", cu_seqlens, "turn_values", turn_values)
        if turn_ids.dim() != 1:
            raise ValueError(f"turn_ids must be [N] with cu_seqlens, got shape {tuple(turn_ids.shape)}")
        if cu_seqlens.shape[0] != B + 1:
            raise ValueError(f"cu_seqlens must have B+1={B + 1} entries, got {cu_seqlens.shape[0]}")
        if _checks.should_validate(validate, turn_values.device):
            _checks.check_cu_seqlens(cu_seqlens, turn_ids.shape[0])
    if _checks.should_validate(validate, turn_values.device):
        _checks.check_turn_ids("turn_ids", turn_ids, K, "turn_values")
    b = pick_backend(backend, turn_values.device, supported=_SUPPORTED, ext_ops=_EXT_OPS_TOKEN,
                     op="token_advantages")
    return _token_adv_op(turn_values, turn_ids, cu_seqlens, b)
