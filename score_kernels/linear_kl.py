"""linear_kl: exact full-vocabulary KL(pi || pi_ref) per token, straight from hidden states.

    z = (hidden @ weight.T + bias) / T,  r = (ref_hidden @ ref_weight.T + ref_bias) / T
    KL = sum_v p_v (log p_v - log q_v),  p = softmax(z), q = softmax(r)

Neither logit tensor is materialised in full. Gradients flow to hidden, weight and bias only
(the reference is a constant); dKL/dz_v = p_v ((z_v - r_v) - E_p[z - r]).

- "triton" (GPU): the vocab-tiled kernels of _vocab_tiles.py that linear_logprobs uses, with the KL constexpr: the forward kernel
  computes a policy tile and a reference tile per (tokens x vocab) block with tl.dot and merges
  both log-sum-exps and E_p[z - r] online; the backward kernel recomputes both tiles for one vocab
  slice at a time and writes dz, followed by GEMMs for dweight (complete per slice) and dhidden
  (fp32 accumulation across slices).
- "torch" (CPU, any device): token chunks forward, vocab slices backward, analytic backward. When a
  gradient follows, the forward keeps u = p (log p - log q - KL) for the first rows that fit the
  shared cache budget (_vocab_tiles.CACHE_BYTES): their dz is then g u / T, which skips both
  recomputation GEMMs (6 GEMMs for a recomputed row against the naive path's 4; 4 for a cached one).
Masked-out positions (mask False) are compacted away: KL 0, zero gradient, no compute.
"""
from __future__ import annotations

import torch

from score_kernels import _checks
from score_kernels import _vocab_tiles as vt
from score_kernels._backend import pick_backend

_SUPPORTED = ("triton", "torch")


def linear_kl_reference(hidden, weight, ref_hidden, ref_weight, *, bias=None, ref_bias=None, temperature=1.0,
                        mask=None):
    """Pure PyTorch, materialises both logit tensors (float64 if any input is float64, else float32)."""
    ct = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    z = hidden.to(ct) @ weight.to(ct).t()
    r = ref_hidden.to(ct) @ ref_weight.to(ct).t()
    if bias is not None:
        z = z + bias.to(ct)
    if ref_bias is not None:
        r = r + ref_bias.to(ct)
    lz = torch.log_softmax(z / temperature, -1)
    lr = torch.log_softmax(r / temperature, -1)
    kl = (lz.exp() * (lz - lr)).sum(-1)
    if mask is not None:
        kl = torch.where(mask, kl, torch.zeros((), dtype=ct))
    return kl


def _lse_in_place(z):
    """Turns z into log_softmax(z) in place (ATen's row-wise kernel) and returns its log-sum-exp:
    z0 - lsm0 from column 0, or the row's max minus the max of lsm where that logit is -inf."""
    z0 = z[:, 0].clone()
    bad = ~torch.isfinite(z0)
    mx = z[bad].amax(1) if bool(bad.any()) else None
    torch._log_softmax(z, 1, False, out=z)
    lse = z0 - z[:, 0]
    if mx is not None:
        lse[bad] = mx - z[bad].amax(1)
    return lse


def _torch_forward(h, w, b, rh, rw, rb, inv_t, cache_rows):
    """Returns (kl, lse, rlse, cache): cache [k, V] holds u = p (log p - log q - KL) of the first
    k <= cache_rows rows, the whole per-element factor of dKL/dz."""
    ct = vt.compute_dtype(h.dtype)
    n, V = h.shape[0], w.shape[0]
    wc, rwc = w.to(ct), rw.to(ct)
    bc = b.to(ct) if b is not None else None
    rbc = rb.to(ct) if rb is not None else None
    C = vt.chunk_rows(V, n, vt.WORK_BYTES // 2)
    kw = {"dtype": ct, "device": h.device}
    zb, rbuf = torch.empty(C, V, **kw), torch.empty(C, V, **kw)
    lse, rlse, kl = (torch.empty(n, **kw) for _ in range(3))
    k = min(n, cache_rows)
    cache = torch.empty(k, V, **kw)
    r0 = 0
    while r0 < n:
        r1 = min(k, r0 + C) if r0 < k else min(n, r0 + C)  # chunks never straddle the cache boundary
        c = r1 - r0
        z = vt.logits_into(zb[:c], h[r0:r1].to(ct), wc, bc, inv_t)
        r = vt.logits_into(cache[r0:r1] if r1 <= k else rbuf[:c], rh[r0:r1].to(ct), rwc, rbc, inv_t)
        lse[r0:r1] = _lse_in_place(z)
        rlse[r0:r1] = _lse_in_place(r)
        r.neg_().add_(z)  # log p - log q
        p = z.exp_()
        klc = torch.mul(p, r, out=rbuf[:c] if r1 <= k else r).sum(1)
        kl[r0:r1] = klc
        if r1 <= k:  # u = p (log p - log q) - p KL, into the cache rows that held log p - log q
            r.mul_(p).sub_(p.mul_(klc[:, None]))
        r0 = r1
    return kl, lse, rlse, cache


def _torch_backward(h, w, b, rh, rw, rb, lse, rlse, kl, cache, g, inv_t, need_h, need_w, need_b):
    ct = vt.compute_dtype(h.dtype)
    n, d = h.shape
    V = w.shape[0]
    k = cache.shape[0]
    hc, rhc, wc, rwc = h.to(ct), rh.to(ct), w.to(ct), rw.to(ct)
    bc = b.to(ct) if b is not None else None
    rbc = rb.to(ct) if rb is not None else None
    vs = max(1, min(V, vt.WORK_BYTES // max(1, 2 * n * 4)))
    kw = {"dtype": ct, "device": h.device}
    buf, buf2 = torch.empty(n * vs, **kw), torch.empty((n - k) * vs, **kw)
    dh = torch.zeros(n, d, **kw) if need_h else None
    dw = torch.empty(V, d, **kw) if need_w else None
    db = torch.empty(V, **kw) if need_b else None
    g = g.to(ct)[:, None] * inv_t
    kl = kl[k:, None]
    for v0 in range(0, V, vs):
        v1 = min(V, v0 + vs)
        width = v1 - v0
        dz = buf[: n * width].view(n, width)
        if k:
            torch.mul(cache[:, v0:v1], g[:k], out=dz[:k])
        if k < n:
            z = vt.logits_into(dz[k:], hc[k:], wc[v0:v1], bc[v0:v1] if bc is not None else None,
                                 inv_t).sub_(lse[k:, None])
            r = vt.logits_into(buf2[: (n - k) * width].view(n - k, width), rhc[k:], rwc[v0:v1],
                                 rbc[v0:v1] if rbc is not None else None, inv_t).sub_(rlse[k:, None])
            # dz = g p (log p - log q - KL) / T
            r.neg_().add_(z).sub_(kl)
            z.exp_().mul_(r).mul_(g[k:])
        vt.slice_grads(dz, hc, wc, v0, v1, dh, dw, db)
    return dh, dw, db


def _index(mask, n):
    if mask is None:
        return None
    if bool(mask.all()):
        return None
    return mask.nonzero().squeeze(1)


def _select(idx, *xs):
    return [x if (x is None or idx is None) else x.index_select(0, idx) for x in xs]


@torch.library.custom_op("score::linear_kl", mutates_args=())
def _kl_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ref_hidden: torch.Tensor,
           ref_weight: torch.Tensor, ref_bias: torch.Tensor | None, mask: torch.Tensor | None,
           temperature: float, backend: str, save: bool
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, V = hidden.shape[0], weight.shape[0]
    od = vt.out_dtype(hidden)
    inv_t = 1.0 / temperature
    idx = _index(mask, n)
    h, rh = _select(idx, hidden, ref_hidden)
    cache = torch.empty(0, V, dtype=od, device=hidden.device)
    if h.shape[0] == 0:
        z = torch.zeros(n, dtype=od, device=hidden.device)
        return z, z.clone(), z.clone(), cache
    if backend == "triton":
        lse, rlse, ed = vt.triton_forward_stats(h.contiguous(), weight.contiguous(), bias, None, inv_t,
                                                entropy=False, rh=rh.contiguous(), rw=ref_weight.contiguous(),
                                                rb=ref_bias)
        kl = ed - lse + rlse
    else:
        kl, lse, rlse, cache = _torch_forward(h, weight, bias, rh, ref_weight, ref_bias, inv_t,
                                              vt.cache_rows(n, V, save))
    if idx is None:
        return kl, lse, rlse, cache
    outs = [torch.zeros(n, dtype=od, device=hidden.device).index_copy_(0, idx, v) for v in (kl, lse, rlse)]
    return outs[0], outs[1], outs[2], cache


@_kl_op.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, temperature, backend, save):
    f = hidden.new_empty(hidden.shape[0], dtype=vt.out_dtype(hidden))
    k = torch.library.get_ctx().new_dynamic_size()  # cached rows depend on the unmasked count
    return f, f.clone(), f.clone(), hidden.new_empty(k, weight.shape[0], dtype=vt.out_dtype(hidden))


@torch.library.custom_op("score::linear_kl_backward", mutates_args=())
def _kl_bwd_op(g: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               ref_hidden: torch.Tensor, ref_weight: torch.Tensor, ref_bias: torch.Tensor | None,
               mask: torch.Tensor | None, kl: torch.Tensor, lse: torch.Tensor, rlse: torch.Tensor,
               cache: torch.Tensor, temperature: float, backend: str, need_h: bool, need_w: bool, need_b: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = hidden.shape[0]
    inv_t = 1.0 / temperature
    idx = _index(mask, n)
    h, rh, gs, kls, lses, rlses = _select(idx, hidden, ref_hidden, g, kl, lse, rlse)
    dh = dw = db = None
    if h.shape[0]:
        if backend == "triton":
            ed = (kls + lses - rlses).float().contiguous()
            dh, dw, db = vt.triton_backward(h.contiguous(), weight.contiguous(), bias, None, lses.contiguous(), ed,
                                            gs.float().contiguous(), None, inv_t, need_h, need_w, need_b,
                                            rh=rh.contiguous(), rw=ref_weight.contiguous(), rb=ref_bias)
        else:
            dh, dw, db = _torch_backward(h, weight, bias, rh, ref_weight, ref_bias, lses, rlses, kls, cache, gs,
                                         inv_t, need_h, need_w, need_b)
    if need_h:
        if dh is None:
            dh = torch.zeros_like(hidden)
        elif idx is not None:
            dh = torch.zeros_like(hidden).index_copy_(0, idx, dh.to(hidden.dtype))
        else:
            dh = dh.to(hidden.dtype)
    else:
        dh = hidden.new_empty(0)
    dw = (dw.to(weight.dtype) if dw is not None else torch.zeros_like(weight)) if need_w else weight.new_empty(0)
    db = (db.to(bias.dtype) if db is not None else torch.zeros_like(bias)) if need_b else weight.new_empty(0)
    return dh, dw, db


@_kl_bwd_op.register_fake
def _(g, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, kl, lse, rlse, cache, temperature, backend,
      need_h, need_w, need_b):
    return vt.grad_placeholders(hidden, weight, bias, need_h, need_w, need_b)


def _setup(ctx, inputs, output):
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, temperature, backend, _save = inputs
    kl, lse, rlse, cache = output
    ctx.mark_non_differentiable(lse, rlse, cache)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, kl, lse, rlse, cache)
    ctx.args = (temperature, backend)


def _backward(ctx, g, _g_lse, _g_rlse, _g_cache):
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, kl, lse, rlse, cache = ctx.saved_tensors
    temperature, backend = ctx.args
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if g is None:
        return (None,) * 10
    dh, dw, db = _kl_bwd_op(g, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, kl, lse, rlse, cache,
                            temperature, backend, need_h, need_w, bool(need_b and bias is not None))
    return (dh if need_h else None, dw if need_w else None, db if need_b else None) + (None,) * 7


_kl_op.register_autograd(_backward, setup_context=_setup)


def linear_kl(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor, ref_weight: torch.Tensor, *,
              bias: torch.Tensor | None = None, ref_bias: torch.Tensor | None = None, temperature: float = 1.0,
              mask: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Exact KL(pi || pi_ref) over the full vocabulary per token, float32 shaped like hidden[..., 0]
    (float64 for float64 inputs). Positions where mask is False give 0 with zero gradient.
    Gradients flow to hidden, weight and bias; the reference side is treated as a constant.
    backend: None picks triton on CUDA, else the chunked torch path; or force "triton"/"torch".
    """
    _checks.linear_inputs(hidden, weight, bias)
    _checks.linear_inputs(ref_hidden, ref_weight, ref_bias, "ref_hidden", "ref_weight", "ref_bias")
    if ref_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(f"ref_hidden has leading shape {tuple(ref_hidden.shape[:-1])} but hidden has "
                         f"{tuple(hidden.shape[:-1])}")
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight has {ref_weight.shape[0]} vocabulary rows but weight has {weight.shape[0]}")
    _checks.same_device("ref_hidden", ref_hidden, "hidden", hidden)
    if mask is not None:
        _checks.tensor("mask", mask)
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
        if mask.shape != hidden.shape[:-1]:
            raise ValueError(f"mask has shape {tuple(mask.shape)} but hidden has leading shape "
                             f"{tuple(hidden.shape[:-1])}")
        _checks.same_device("mask", mask, "hidden", hidden)
    temperature = _checks.temperature(temperature)
    b = pick_backend(backend, hidden.device, supported=_SUPPORTED, op="linear_kl")
    ct = vt.common_dtype(hidden, weight, bias)
    if ct == torch.float64 or ref_hidden.dtype == torch.float64 or ref_weight.dtype == torch.float64:
        if backend == "triton":
            raise ValueError("linear_kl: backend 'triton' does not take float64 inputs")
        b, ct = "torch", torch.float64
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1]).to(ct)
    rh2 = ref_hidden.detach().reshape(-1, ref_hidden.shape[-1]).to(ct)
    m2 = mask.reshape(-1) if mask is not None else None
    w2, b2 = weight.to(ct), bias.to(ct) if bias is not None else None
    kl, _, _, _ = _kl_op(h2, w2, b2, rh2, ref_weight.detach().to(ct),
                         ref_bias.detach().to(ct) if ref_bias is not None else None, m2, temperature, b,
                         vt.needs_grad(hidden, weight, bias))
    return kl.reshape(lead)
