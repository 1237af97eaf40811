"""policy_loss: fused per-turn policy-gradient + KL loss over sampled-token log-probs.

Per policy token t (0 <= turn_ids[t] < K; other tokens contribute nothing and get exactly 0
gradient, even when their inputs are NaN):
    ratio = exp(logprobs - old_logprobs)         (old_logprobs defaults to logprobs.detach():
                                                  ratio = 1, the REINFORCE gradient -A)
    pg    = -A * ratio, or with clip_eps the PPO surrogate max(-A*ratio, -A*clip(ratio, 1-lo, 1+hi))
    l_t   = pg + kl_coef[turn] * token_kl(logprobs, ref_logprobs, kl_estimator)   (KL: if ref given)
          or pg + kl_coef[turn] * kl_tokens[t]   (a caller's per-token KL, e.g. linear_kl's exact KL;
                                                  differentiable: the loss backpropagates into it)
Aggregation (`agg`), with rows = sequences (the B rows, or the cu_seqlens segments):
    "token-mean":          sum_t l_t / D, D = policy tokens (or global_token_count)
    "seq-mean-token-sum":  sum_b (sum_{t in b} l_t) / S
    "seq-mean-token-mean": sum_b (mean_{t in b} l_t) / S
    S = rows with at least one policy token, or global_token_count (then read as the global
    sequence count). A global count makes the loss independent of how a batch is split over ranks.

Every backend computes dl/dlogprob per token in the forward pass (one pass over the tokens) and
the row weights w_b (loss = sum_b w_b * rowsum_b); backward is grad = grad_loss * w_b * dl.

Layers: compiled CUDA and CPU kernels (csrc/, math in common/pg_math.h + common/kl_math.h), a
PyTorch path ("torch" backend) with the same structure, the autograd-chain reference
`policy_loss_reference`, and torch.library ops so torch.compile(fullgraph=True) traces callers.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from score_kernels import _checks
from score_kernels._backend import pick_backend
from score_kernels.token_kl import ESTIMATORS as KL_ESTIMATORS
from score_kernels.token_kl import grad_reference as _kl_grad_reference
from score_kernels.token_kl import token_kl_reference

AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")  # index = pg_math.h PGAgg
MAX_TURNS = 8  # csrc/common/pg_math.h PG_MAX_TURNS
_FIXED_STATS = ("pg_loss", "kl_loss", "tokens", "seqs", "clip_frac", "ratio_mean", "kl_mean")
_SUPPORTED = ("cuda", "cpu", "torch")
_EXT_OPS = ("policy_loss_fwd", "policy_loss_bwd")


def stat_names(K: int) -> list[str]:
    """Names of the entries of the stats vector, in order (pg_math.h PGStat)."""
    return (list(_FIXED_STATS) + [f"kl_turn{k}" for k in range(K)] + [f"adv_turn{k}" for k in range(K)]
            + [f"tokens_turn{k}" for k in range(K)])


def _ctype(lp: torch.Tensor) -> torch.dtype:
    return torch.float64 if lp.dtype == torch.float64 else torch.float32


def _rowsum(x: torch.Tensor, rows: torch.Tensor | None, B: int) -> torch.Tensor:
    if rows is None:
        return x.sum(1)
    return torch.zeros(B, dtype=x.dtype, device=x.device).index_add(0, rows, x)


def _token_terms(lp, adv, ids, old, ref, coefs, est, clip, *, analytic, kl_tokens=None):
    """Masked per-token pg, kl, coef*kl (and dl when analytic) in the compute dtype."""
    ct = _ctype(lp)
    K = len(coefs)
    mask = (ids >= 0) & (ids < K)
    zero = torch.zeros((), dtype=ct, device=lp.device)
    # where (not multiply) so NaN/inf at masked positions reach neither values nor gradients
    lp = torch.where(mask, lp.to(ct), zero)
    adv = torch.where(mask, adv.to(ct), zero)
    if old is not None:
        ratio = torch.exp(lp - torch.where(mask, old.to(ct), zero))
    else:
        ratio = torch.exp(lp - lp.detach())
    pg = -adv * ratio
    dpg = pg
    clipped = torch.zeros_like(mask)
    if clip is not None:
        pg2 = -adv * ratio.clamp(1.0 - clip[0], 1.0 + clip[1])
        clipped = pg2 > pg
        dpg = torch.where(clipped, zero, pg)
        pg = torch.maximum(pg, pg2)
    coef = torch.zeros_like(lp)  # a where-chain, not an indexed H2D tensor: stays CUDA-graph capturable
    for k, c in enumerate(coefs):
        coef = torch.where(ids == k, c, coef)
    if kl_tokens is not None:  # reference only: the public op adds this term in _add_kl_tokens
        kl = torch.where(mask, kl_tokens.to(ct), zero)
        dkl = None
    elif ref is not None:
        ref = torch.where(mask, ref.to(ct), zero)
        kl = token_kl_reference(lp, ref, KL_ESTIMATORS[est]).to(ct)
        dkl = _kl_grad_reference(torch.ones_like(lp), lp.detach(), ref, est) if analytic else None
    else:
        kl = torch.zeros_like(lp)
        dkl = torch.zeros_like(lp) if analytic else None
    fz = lambda x: torch.where(mask, x, zero)
    out = {"mask": mask, "pg": fz(pg), "kl": fz(kl), "klterm": fz(coef * kl), "ratio": fz(ratio.detach()),
           "clipped": clipped & mask, "adv": adv}
    if analytic:
        out["dl"] = fz(dpg.detach() + coef * dkl)
    return out


def _finish(terms, ids, rows, B, K, agg, gcount):
    """Row sums -> row weights, loss and the stats vector (shared by the reference and the torch
    backend; the loss keeps the autograd graph of terms['pg'] / terms['klterm'])."""
    ct = terms["pg"].dtype
    mask = terms["mask"]
    m = mask.to(ct)
    rown = _rowsum(m, rows, B)
    rowl = _rowsum(terms["pg"], rows, B) + _rowsum(terms["klterm"], rows, B)
    tokens = m.sum()
    seqs = (rown > 0).to(ct).sum()
    if gcount is not None:
        denom = gcount.to(ct)
    else:
        denom = (tokens if agg == 0 else seqs).clamp_min(1)
    if agg == 0:
        w = (1.0 / denom).expand(B)
    elif agg == 1:
        w = torch.where(rown > 0, 1.0 / denom, torch.zeros_like(rown))
    else:
        w = torch.where(rown > 0, 1.0 / (rown.clamp_min(1) * denom), torch.zeros_like(rown))
    w = w.detach()
    loss = (w * rowl).sum()
    pg_loss = (w * _rowsum(terms["pg"].detach(), rows, B)).sum()
    kl_loss = (w * _rowsum(terms["klterm"].detach(), rows, B)).sum()
    t1 = tokens.clamp_min(1)
    klv = terms["kl"].detach()
    fixed = [pg_loss, kl_loss, tokens, seqs, terms["clipped"].to(ct).sum() / t1, terms["ratio"].sum() / t1,
             klv.sum() / t1]
    onehot = (ids.long().unsqueeze(-1) == torch.arange(K, device=ids.device)) & mask.unsqueeze(-1)
    oh = onehot.to(ct).reshape(-1, K)
    nk = oh.sum(0)
    kl_k = (klv.reshape(-1, 1) * oh).sum(0) / nk.clamp_min(1)
    adv_k = (terms["adv"].detach().reshape(-1, 1) * oh).sum(0) / nk.clamp_min(1)
    stats = torch.cat([torch.stack(fixed), kl_k, adv_k, nk]).float()
    return loss, stats, w


def _coefs(kl_coef, num_turns):
    if isinstance(kl_coef, torch.Tensor):
        kl_coef = kl_coef.detach().reshape(-1).tolist() if kl_coef.dim() else float(kl_coef)
    if isinstance(kl_coef, numbers.Real):
        return [float(kl_coef)] * (2 if num_turns is None else int(num_turns))
    return [float(c) for c in kl_coef]


def _clip(clip_eps):
    if clip_eps is None:
        return None
    if isinstance(clip_eps, numbers.Real):
        return (float(clip_eps), float(clip_eps))
    lo, hi = clip_eps
    return (float(lo), float(hi))


def policy_loss_reference(logprobs, advantages, turn_ids, *, old_logprobs=None, ref_logprobs=None, kl_coef=0.0,
                          kl_estimator="k3", clip_eps=None, agg="token-mean", global_token_count=None,
                          cu_seqlens=None, num_turns=None, kl_tokens=None):
    """Plain autograd chain (differentiate it with autograd). Same semantics as policy_loss."""
    coefs = _coefs(kl_coef, num_turns)
    K = len(coefs)
    B = logprobs.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    rows = None if cu_seqlens is None else _checks.row_index(cu_seqlens.long(), logprobs.shape[0])
    terms = _token_terms(logprobs, advantages, turn_ids.long(), old_logprobs, ref_logprobs, coefs,
                         KL_ESTIMATORS.index(kl_estimator), _clip(clip_eps), analytic=False, kl_tokens=kl_tokens)
    gc = None
    if global_token_count is not None:
        gc = torch.as_tensor(global_token_count, dtype=_ctype(logprobs), device=logprobs.device)
    loss, stats, _ = _finish(terms, turn_ids, rows, B, K, AGGS.index(agg), gc)
    return loss, dict(zip(stat_names(K), stats.unbind()))


# ----------------------------------------------------------------------------- torch backend
def _torch_fwd(lp, adv, ids, old, ref, cu, gc_t, coefs, est, clip_lo, clip_hi, agg, gc_f):
    K = len(coefs)
    B = lp.shape[0] if cu is None else cu.shape[0] - 1
    rows = None if cu is None else _checks.row_index(cu.long(), lp.shape[0])
    clip = None if clip_lo < 0 else (clip_lo, clip_hi)
    with torch.no_grad():
        terms = _token_terms(lp, adv, ids.long(), old, ref, coefs, est, clip, analytic=True)
        gc = gc_t if gc_t is not None else (torch.full((), gc_f, dtype=_ctype(lp), device=lp.device) if gc_f > 0
                                            else None)
        loss, stats, w = _finish(terms, ids, rows, B, K, agg, gc)
    return loss, stats, terms["dl"].to(lp.dtype), w.contiguous()


def _torch_bwd(g, dl, w, cu):
    if cu is None:
        s = w.unsqueeze(1) * g.to(w.dtype)
    else:
        s = w[_checks.row_index(cu.long(), dl.shape[0])] * g.to(w.dtype)
    return torch.where(dl == 0, torch.zeros((), dtype=dl.dtype, device=dl.device), (dl.to(w.dtype) * s).to(dl.dtype))


# ----------------------------------------------------------------------------- torch.library
@torch.library.custom_op("score::policy_loss", mutates_args=())
def _pl_op(logprobs: torch.Tensor, advantages: torch.Tensor, turn_ids: torch.Tensor,
           old_logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
           global_count: torch.Tensor | None, kl_coef: list[float], estimator: int, clip_lo: float, clip_hi: float,
           agg: int, global_count_f: float, backend: str
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend in ("cuda", "cpu"):
        return tuple(torch.ops.score_ext.policy_loss_fwd(
            logprobs, advantages, turn_ids, old_logprobs, ref_logprobs, cu_seqlens, global_count, kl_coef,
            estimator, clip_lo, clip_hi, agg, global_count_f))
    return _torch_fwd(logprobs, advantages, turn_ids, old_logprobs, ref_logprobs, cu_seqlens, global_count,
                      kl_coef, estimator, clip_lo, clip_hi, agg, global_count_f)


@_pl_op.register_fake
def _(logprobs, advantages, turn_ids, old_logprobs, ref_logprobs, cu_seqlens, global_count, kl_coef, estimator,
      clip_lo, clip_hi, agg, global_count_f, backend):
    ct = _ctype(logprobs)
    B = logprobs.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return (logprobs.new_empty((), dtype=ct), logprobs.new_empty((len(_FIXED_STATS) + 3 * len(kl_coef),),
            dtype=torch.float32), torch.empty_like(logprobs), logprobs.new_empty((B,), dtype=ct))


@torch.library.custom_op("score::policy_loss_backward", mutates_args=())
def _pl_bwd_op(grad: torch.Tensor, dl: torch.Tensor, row_w: torch.Tensor, cu_seqlens: torch.Tensor | None,
               backend: str) -> torch.Tensor:
    if backend in ("cuda", "cpu"):
        return torch.ops.score_ext.policy_loss_bwd(grad, dl, row_w, cu_seqlens)
    return _torch_bwd(grad, dl, row_w, cu_seqlens)


@_pl_bwd_op.register_fake
def _(grad, dl, row_w, cu_seqlens, backend):
    return torch.empty_like(dl)


def _setup_context(ctx, inputs, output):
    _, stats, dl, w = output
    ctx.mark_non_differentiable(stats, dl, w)
    ctx.save_for_backward(dl, w, inputs[5])
    ctx.backend = inputs[-1]


def _backward(ctx, g_loss, g_stats, g_dl, g_w):
    dl, w, cu = ctx.saved_tensors
    return (_pl_bwd_op(g_loss, dl, w, cu, ctx.backend),) + (None,) * 13


_pl_op.register_autograd(_backward, setup_context=_setup_context)


def _add_kl_tokens(loss, stats, w, kl_tokens, ids, cu, coefs):
    """loss + sum_b w_b * sum_{t in b} coef[turn_t] * kl_t as a torch composition on top of any
    backend's PG loss: the fused kernels know only the sampled estimators, and reusing their row
    weights w keeps the one agg / global_token_count normalisation. Returns (loss, stats dict)."""
    K = len(coefs)
    ct = loss.dtype
    ids = ids.long()
    mask = (ids >= 0) & (ids < K)
    zero = torch.zeros((), dtype=ct, device=loss.device)
    coef = torch.zeros(ids.shape, dtype=ct, device=loss.device)
    for k, c in enumerate(coefs):
        coef = torch.where(ids == k, c, coef)
    # where, not multiply: NaN/inf KL at masked tokens reaches neither the loss nor its gradient
    kl = torch.where(mask, kl_tokens.to(ct), zero)
    klterm = torch.where(mask, coef * kl, zero)
    B = w.shape[0]
    rows = None if cu is None else _checks.row_index(cu.long(), ids.shape[0])
    kl_loss = (w * _rowsum(klterm, rows, B)).sum()
    out = dict(zip(stat_names(K), stats.unbind()))
    klv = kl.detach()
    onehot = ((ids.unsqueeze(-1) == torch.arange(K, device=ids.device)) & mask.unsqueeze(-1)).to(ct).reshape(-1, K)
    nk = onehot.sum(0)
    kl_k = (klv.reshape(-1, 1) * onehot).sum(0) / nk.clamp_min(1)
    out["kl_loss"] = kl_loss.detach().float()
    out["kl_mean"] = (klv.sum() / nk.sum().clamp_min(1)).float()
    for k in range(K):
        out[f"kl_turn{k}"] = kl_k[k].float()
    return loss + kl_loss, out


# ----------------------------------------------------------------------------- arguments
class _Spec(NamedTuple):
    """policy_loss's scalar arguments, checked and in the op's form."""
    coefs: list[float]  # kl_coef per turn; K = len(coefs)
    estimator: int  # index into KL_ESTIMATORS
    clip_lo: float  # -1: no clipping
    clip_hi: float
    agg: int  # index into AGGS
    gc_t: torch.Tensor | None  # global_token_count given as a tensor, 0-dim in the compute dtype
    gc_f: float  # or given as a number (0.0: not given)


def _normalise_args(logprobs, advantages, turn_ids, old_logprobs, ref_logprobs, kl_tokens, cu_seqlens, kl_coef,
                    kl_estimator, clip_eps, agg, global_token_count, num_turns, validate) -> _Spec:
    """Check policy_loss's arguments (ValueError naming the argument) and normalise its scalar ones."""
    _checks.tensor("logprobs", logprobs, floating=True, ndim=(1, 2))
    _checks.tensor("advantages", advantages, floating=True)
    _checks.tensor("turn_ids", turn_ids, integer=True)
    _checks.same_shape("advantages", advantages, "logprobs", logprobs)
    _checks.same_shape("turn_ids", turn_ids, "logprobs", logprobs)
    _checks.same_device("advantages", advantages, "logprobs", logprobs)
    _checks.same_device("turn_ids", turn_ids, "logprobs", logprobs)
    for name, x in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs), ("kl_tokens", kl_tokens)):
        if x is not None:
            _checks.tensor(name, x, floating=True)
            _checks.same_shape(name, x, "logprobs", logprobs)
            _checks.same_device(name, x, "logprobs", logprobs)
    if cu_seqlens is not None:
        _checks.tensor("cu_seqlens", cu_seqlens, integer=True, ndim=1)
        _checks.same_device("cu_seqlens", cu_seqlens, "logprobs", logprobs)
        if logprobs.dim() != 1:
            raise ValueError(f"logprobs must be [N] with cu_seqlens, got shape {tuple(logprobs.shape)}")
        if cu_seqlens.shape[0] < 1:
            raise ValueError("cu_seqlens must have B+1 >= 1 entries")
    elif logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T] (or [N] with cu_seqlens), got shape {tuple(logprobs.shape)}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if agg not in AGGS:
        raise ValueError(f"agg must be one of {AGGS}, got {agg!r}")
    if num_turns is not None and not (isinstance(num_turns, int) and 1 <= num_turns <= MAX_TURNS):
        raise ValueError(f"num_turns must be an int in [1, {MAX_TURNS}], got {num_turns!r}")
    try:
        coefs = _coefs(kl_coef, num_turns)
    except (TypeError, ValueError) as e:
        raise ValueError(f"kl_coef must be a float or one float per turn, got {kl_coef!r}") from e
    if not 1 <= len(coefs) <= MAX_TURNS or any(math.isnan(c) for c in coefs):
        raise ValueError(f"kl_coef must give 1..{MAX_TURNS} finite values, got {kl_coef!r}")
    if num_turns is not None and len(coefs) != num_turns:
        raise ValueError(f"kl_coef has {len(coefs)} values but num_turns={num_turns}")
    if kl_tokens is not None and ref_logprobs is not None:
        raise ValueError("kl_tokens replaces the sampled KL of ref_logprobs: give one of them, not both")
    if ref_logprobs is None and kl_tokens is None and any(c != 0.0 for c in coefs):
        raise ValueError(f"kl_coef={kl_coef!r} is non-zero but neither ref_logprobs nor kl_tokens is given: "
                         "no KL would be applied")
    try:
        clip = _clip(clip_eps)
    except (TypeError, ValueError) as e:
        raise ValueError(f"clip_eps must be None, a float or (low, high), got {clip_eps!r}") from e
    if clip is not None and not (clip[0] >= 0 and clip[1] >= 0):
        raise ValueError(f"clip_eps must be >= 0, got {clip_eps!r}")
    gc_t, gc_f = None, 0.0
    if global_token_count is not None:
        if isinstance(global_token_count, torch.Tensor):
            if global_token_count.dim() != 0:
                raise ValueError(f"global_token_count must be a number or a 0-dim tensor, got shape "
                                 f"{tuple(global_token_count.shape)}")
            gc_t = global_token_count.detach().to(logprobs.device, _ctype(logprobs))
        elif isinstance(global_token_count, numbers.Real) and global_token_count > 0:
            gc_f = float(global_token_count)
        else:
            raise ValueError(f"global_token_count must be > 0, got {global_token_count!r}")
    if _checks.should_validate(validate, logprobs.device):  # the checks that read tensor values
        _checks.check_turn_ids("turn_ids", turn_ids, len(coefs), "kl_coef/num_turns")
        if gc_t is not None and not bool(gc_t > 0):
            raise ValueError(f"global_token_count must be > 0, got {float(gc_t)}")
        if cu_seqlens is not None:
            _checks.check_cu_seqlens(cu_seqlens, logprobs.shape[0])
    return _Spec(coefs, KL_ESTIMATORS.index(kl_estimator), -1.0 if clip is None else clip[0],
                 -1.0 if clip is None else clip[1], AGGS.index(agg), gc_t, gc_f)


# ----------------------------------------------------------------------------- public API
def policy_loss(logprobs: torch.Tensor, advantages: torch.Tensor, turn_ids: torch.Tensor, *,
                old_logprobs: torch.Tensor | None = None, ref_logprobs: torch.Tensor | None = None,
                kl_coef=0.0, kl_estimator: str = "k3", clip_eps=None, agg: str = "token-mean",
                global_token_count=None, backend: str | None = None, cu_seqlens: torch.Tensor | None = None,
                num_turns: int | None = None, validate: bool | None = None,
                kl_tokens: torch.Tensor | None = None):
    """Fused per-turn PG + KL loss. Returns (loss, stats): loss a 0-dim tensor (float64 for float64
    logprobs, else float32) differentiable w.r.t. logprobs; stats a dict of 0-dim float32 tensors
    (pg_loss, kl_loss, tokens, seqs, clip_frac, ratio_mean, kl_mean, kl_turn{k}, adv_turn{k},
    tokens_turn{k}), all computed on the device without a host sync.

    Layout: [B, T] tensors, or packed [N] tensors with cu_seqlens [B+1].
    kl_coef: a float, or one float per turn (SCoRe Stage I: (beta2, beta1) for turns (0, 1)).
    K (the number of turns) = len(kl_coef) for a sequence, else num_turns (default 2).
    clip_eps: None, eps, or (eps_low, eps_high). global_token_count: number or 0-dim tensor.
    validate: reject turn ids >= K and a 0-dim global_token_count tensor <= 0 (None: CPU tensors
    only; on a GPU that check is a host sync; unchecked ids >= K are treated as masked).
    kl_tokens: a per-token KL [B, T] / [N] (e.g. linear_kl's exact KL) that replaces the sampled
    estimator (so not with ref_logprobs); weighted by kl_coef per turn, aggregated like the PG term,
    and differentiable: the loss backpropagates into kl_tokens as well as logprobs.
    A non-zero kl_coef needs ref_logprobs or kl_tokens (else it would silently apply no KL).
    """
    spec = _normalise_args(logprobs, advantages, turn_ids, old_logprobs, ref_logprobs, kl_tokens, cu_seqlens,
                           kl_coef, kl_estimator, clip_eps, agg, global_token_count, num_turns, validate)
    b = pick_backend(backend, logprobs.device, supported=_SUPPORTED, ext_ops=_EXT_OPS, op="policy_loss")
    dt = logprobs.dtype
    cast = lambda x: None if x is None else x.detach().to(dt)
    loss, stats, _, w = _pl_op(logprobs, advantages.detach(), turn_ids, cast(old_logprobs), cast(ref_logprobs),
                               cu_seqlens, spec.gc_t, spec.coefs, spec.estimator, spec.clip_lo, spec.clip_hi,
                               spec.agg, spec.gc_f, b)
    if kl_tokens is not None:
        return _add_kl_tokens(loss, stats, w, kl_tokens, turn_ids, cu_seqlens, spec.coefs)
    return loss, dict(zip(stat_names(len(spec.coefs)), stats.unbind()))
