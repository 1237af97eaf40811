"""linear_logprobs: log-probabilities (and entropy) of target tokens straight from hidden states.

    logits   = (hidden @ weight.T + bias) / temperature
    logprobs = log_softmax(logits)[target]
    entropy  = -sum_v p_v log p_v

The [tokens, vocab] logits are never materialised in full:
- "triton" (GPU; the CPU interpreter in tests): the forward kernel tiles tokens x vocab, runs tl.dot
  into fp32 accumulators and merges log-sum-exp online, storing only per-token statistics (lse,
  target logit, entropy). The backward kernel recomputes logits tile by tile for one vocab slice at
  a time and writes dz for that slice; dweight[slice] = dz.T @ hidden is then complete in one GEMM
  (fp32 accumulation inside the GEMM, no cross-slice accumulation) and dhidden accumulates over
  slices in an fp32 buffer.
- "torch" (CPU, any device): token chunks sized from a memory budget, fp32 GEMMs through torch
  (MKL/cuBLAS), an analytic backward without autograd through the chunks. Logits of the first
  chunks are kept from forward to backward while they fit a second budget, which saves their
  recomputation; the rest are recomputed.

Tokens whose target equals ignore_index are compacted away before any GEMM: they cost nothing and
get logprob 0, entropy 0 and exactly zero gradient.

The fused Triton kernels, the budgets and the chunk pieces live in score_kernels/_vocab_tiles.py,
shared with linear_kl and logits_logprobs.
"""
from __future__ import annotations

import torch

from score_kernels import _checks
from score_kernels import _vocab_tiles as vt
from score_kernels._backend import pick_backend

_SUPPORTED = ("triton", "torch")


# ----------------------------------------------------------------------------- reference
def linear_logprobs_reference(hidden, weight, targets, bias=None, *, temperature=1.0, ignore_index=-100,
                              return_entropy=False):
    """Pure PyTorch, materialises the logits. float64 when any input is float64, else float32."""
    ct = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    z = hidden.to(ct) @ weight.to(ct).t()
    if bias is not None:
        z = z + bias.to(ct)
    z = z / temperature
    lsm = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    lp = torch.where(valid, lsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1), torch.zeros((), dtype=ct))
    if not return_entropy:
        return lp.to(torch.float32) if ct == torch.float32 else lp
    ent = -torch.where(lsm > float("-inf"), lsm.exp() * lsm, torch.zeros((), dtype=ct)).sum(-1)
    ent = torch.where(valid, ent, torch.zeros((), dtype=ct))
    if ct == torch.float32:
        return lp.to(torch.float32), ent.to(torch.float32)
    return lp, ent



# ----------------------------------------------------------------------------- chunked torch path
def torch_forward(h, w, b, t, inv_t, entropy, cache_rows):
    """Chunked forward over token rows. h [n, d], t [n] valid targets. Returns (lp, ent or None,
    lse, cache) where cache [k, V] holds log_softmax of the first k <= cache_rows rows.

    ATen's log_softmax works row by row with the row hot in L2, so it beats separate max / exp /
    sum sweeps over a whole chunk by about 2x; the temperature is folded into the small hidden chunk."""
    ct = vt.compute_dtype(h.dtype)
    n, V = h.shape[0], w.shape[0]
    wc = w.to(ct)
    bc = b.to(ct) * inv_t if b is not None else None
    # Bigger chunks make better GEMMs. When a backward follows, it will hold dweight ([V, d] fp32)
    # next to the cache, so the forward may use that much more scratch without raising the peak.
    C = vt.chunk_rows(V, n, (vt.WORK_BYTES + (V * w.shape[1] * 4 if cache_rows else 0)) // 2)
    k = min(n, cache_rows)
    kw = {"dtype": ct, "device": h.device}
    cache = torch.empty(k, V, **kw)
    lse = torch.empty(n, **kw)
    lp = torch.empty(n, **kw)
    ent = torch.empty(n, **kw) if entropy else None
    zb = torch.empty(min(C, n), V, **kw)
    lb = torch.empty(min(C, n - k), V, **kw) if k < n else None
    r0 = 0
    while r0 < n:
        r1 = min(k, r0 + C) if r0 < k else min(n, r0 + C)  # chunks never straddle the cache boundary
        c = r1 - r0
        hc = h[r0:r1].to(ct)
        z = torch.matmul(hc * inv_t if inv_t != 1.0 else hc, wc.t(), out=zb[:c])
        if bc is not None:
            z.add_(bc)
        lsm = cache[r0:r1] if r1 <= k else lb[:c]
        torch._log_softmax(z, 1, False, out=lsm)
        tc = t[r0:r1, None]
        lpc = lsm.gather(1, tc).squeeze(1)
        lsec = z.gather(1, tc).squeeze(1) - lpc
        bad = ~torch.isfinite(lpc)
        if bool(bad.any()):  # a target with a -inf logit: take lse at the row's max instead
            lsec[bad] = z[bad].amax(1) - lsm[bad].amax(1)
        lp[r0:r1], lse[r0:r1] = lpc, lsec
        if entropy:  # entr(p) = -p log p, 0 at p = 0 (so -inf logits are fine)
            p = torch.exp(lsm, out=z)
            ent[r0:r1] = torch.special.entr(p, out=p).sum(1)
        r0 = r1
    return lp, ent, lse, cache


def torch_backward(h, w, b, t, lse, ent, cache, g, ge, inv_t, need_h, need_w, need_b):
    """Analytic backward over vocab slices: dz = (g (onehot - p) - ge p (lsm + H)) * inv_t.
    Slicing the vocab (not the tokens) makes dweight[slice] = dz.T @ h one full-depth GEMM
    written once, instead of a shallow GEMM re-reading all of dweight per token chunk.
    Recomputed rows get lsm straight from one GEMM: [h/T, b/T, -lse] @ [W, b, 1]^T per slice."""
    ct = vt.compute_dtype(h.dtype)
    n, d = h.shape
    V = w.shape[0]
    wc = w.to(ct)
    hc = h.to(ct)
    k = cache.shape[0]
    kw = {"dtype": ct, "device": h.device}
    nbuf = 2 if ge is not None else 1
    vs = max(1, min(V, vt.WORK_BYTES // max(1, nbuf * n * 4)))
    buf = torch.empty(n * vs, **kw)
    buf2 = torch.empty(n * vs, **kw) if nbuf == 2 else None
    dh = torch.zeros(n, d, **kw) if need_h else None
    dw = torch.empty(V, d, **kw) if need_w else None
    db = torch.empty(V, **kw) if need_b else None
    g = g.to(ct)[:, None]
    ge = ge.to(ct)[:, None] if ge is not None else None
    coef = -(g + ge * ent[:, None]) * inv_t if ge is not None else g * -inv_t
    extra = 2 if b is not None else 1
    if k < n:
        cols = [hc[k:] * inv_t]
        if b is not None:
            cols.append(torch.full((n - k, 1), inv_t, **kw))
        cols.append(-lse[k:, None].to(ct))
        h_aug = torch.cat(cols, 1)
        w_aug = torch.empty(vs, d + extra, **kw)
        w_aug[:, d + extra - 1] = 1.0
    for v0 in range(0, V, vs):
        v1 = min(V, v0 + vs)
        width = v1 - v0
        lsm = buf[: n * width].view(n, width)
        if k < n:
            w_aug[:width, :d] = wc[v0:v1]
            if b is not None:
                w_aug[:width, d] = b[v0:v1]
            torch.matmul(h_aug, w_aug[:width].t(), out=lsm[k:])
        if ge is not None:
            if k:
                lsm[:k].copy_(cache[:, v0:v1])
            p = torch.exp(lsm, out=buf2[: n * width].view(n, width))
            lsm.clamp_(min=vt.LOWEST).mul_(p)  # p * lsm; -inf logits (p = 0) contribute 0
            dz = p.mul_(coef).add_(lsm.mul_(ge), alpha=-inv_t)
        else:
            if k:
                torch.exp(cache[:, v0:v1], out=lsm[:k])
            if k < n:
                lsm[k:].exp_()
            dz = lsm.mul_(coef)
        sel = (t >= v0) & (t < v1)
        if bool(sel.any()):
            rows = sel.nonzero().squeeze(1)
            dz.index_put_((rows, t[rows] - v0), (g[rows, 0] * inv_t), accumulate=True)
        vt.slice_grads(dz, hc, wc, v0, v1, dh, dw, db)
    return dh, dw, db


# ----------------------------------------------------------------------------- op bodies
def _valid_index(t: torch.Tensor, ignore_index: int):
    valid = t != ignore_index
    if bool(valid.all()):
        return None
    return valid.nonzero().squeeze(1)


def _fwd_impl(h, w, b, t, temperature, ignore_index, entropy, backend, save):
    """Returns (lp [n], ent [n], lse [n], cache [k, V]); rows of ignored targets are zero."""
    n, V = h.shape[0], w.shape[0]
    inv_t = 1.0 / temperature
    idx = _valid_index(t, ignore_index)
    hs, ts = (h, t) if idx is None else (h.index_select(0, idx), t.index_select(0, idx))
    f32 = {"dtype": vt.out_dtype(h), "device": h.device}
    cache = torch.empty(0, V, **f32)
    if hs.shape[0] == 0:
        z = torch.zeros(n, **f32)
        return z, z.clone(), z.clone(), cache
    if backend == "triton":
        lse, lp, ent = vt.triton_forward_stats(hs.contiguous(), w.contiguous(), b, ts.contiguous(), inv_t,
                                               entropy=entropy)
    else:
        lp, ent, lse, cache = torch_forward(hs, w, b, ts, inv_t, entropy, vt.cache_rows(n, V, save))
    if ent is None:
        ent = torch.zeros_like(lp)
    if idx is None:
        return lp, ent, lse, cache
    out = [torch.zeros(n, **f32).index_copy_(0, idx, v) for v in (lp, ent, lse)]
    return out[0], out[1], out[2], cache


def _bwd_impl(g, ge, h, w, b, t, lse, ent, cache, temperature, ignore_index, backend, need_h, need_w, need_b,
              entropy):
    inv_t = 1.0 / temperature
    idx = _valid_index(t, ignore_index)
    if idx is not None:
        h, t, g, lse, ent = (x.index_select(0, idx) for x in (h, t, g, lse, ent))
        ge = ge.index_select(0, idx) if ge is not None else None
    ge = ge if entropy else None
    if h.shape[0] == 0:
        dh = dw = db = None
    elif backend == "triton":
        dh, dw, db = vt.triton_backward(h.contiguous(), w.contiguous(), b, t.contiguous(), lse.contiguous(),
                                        ent.contiguous(), g.float().contiguous(),
                                        ge.float().contiguous() if ge is not None else None,
                                        inv_t, need_h, need_w, need_b)
    else:
        dh, dw, db = torch_backward(h, w, b, t, lse, ent, cache, g, ge, inv_t, need_h, need_w, need_b)
    n_full = h.shape[0] if idx is None else None
    return dh, dw, db, idx, n_full


# ----------------------------------------------------------------------------- torch.library
@torch.library.custom_op("score::linear_logprobs", mutates_args=())
def _lp_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
           temperature: float, ignore_index: int, entropy: bool, backend: str, save: bool
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd_impl(hidden, weight, bias, targets, temperature, ignore_index, entropy, backend, save)


@_lp_op.register_fake
def _(hidden, weight, bias, targets, temperature, ignore_index, entropy, backend, save):
    n, V = hidden.shape[0], weight.shape[0]
    f = hidden.new_empty(n, dtype=vt.out_dtype(hidden))
    ctx = torch.library.get_ctx()
    k = ctx.new_dynamic_size()  # how many rows fit the cache depends on the valid-token count
    return f, f.clone(), f.clone(), hidden.new_empty(k, V, dtype=vt.out_dtype(hidden))


@torch.library.custom_op("score::linear_logprobs_backward", mutates_args=())
def _lp_bwd_op(g: torch.Tensor, ge: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None, targets: torch.Tensor, lse: torch.Tensor, ent: torch.Tensor,
               cache: torch.Tensor, temperature: float, ignore_index: int, entropy: bool, backend: str,
               need_h: bool, need_w: bool, need_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dh, dw, db, idx, _ = _bwd_impl(g, ge, hidden, weight, bias, targets, lse, ent, cache, temperature,
                                   ignore_index, backend, need_h, need_w, need_b, entropy)
    n, d = hidden.shape
    if need_h:
        full = torch.zeros(n, d, dtype=hidden.dtype, device=hidden.device)
        if dh is not None:
            full = full.index_copy_(0, idx, dh.to(hidden.dtype)) if idx is not None else dh.to(hidden.dtype)
        dh = full
    else:
        dh = hidden.new_empty(0)
    if need_w:
        dw = dw.to(weight.dtype) if dw is not None else torch.zeros_like(weight)
    else:
        dw = weight.new_empty(0)
    if need_b:
        db = db.to(bias.dtype) if db is not None else torch.zeros_like(bias)
    else:
        db = weight.new_empty(0)
    return dh, dw, db


@_lp_bwd_op.register_fake
def _(g, ge, hidden, weight, bias, targets, lse, ent, cache, temperature, ignore_index, entropy, backend,
      need_h, need_w, need_b):
    return vt.grad_placeholders(hidden, weight, bias, need_h, need_w, need_b)


def _setup(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, ignore_index, entropy, backend, _save = inputs
    _, _, lse, cache = output
    ent = output[1]
    # Unused outputs must not get materialised zero gradients: the cache alone is [rows, V].
    ctx.mark_non_differentiable(lse, cache)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, weight, bias, targets, lse, ent, cache)
    ctx.args = (temperature, ignore_index, entropy, backend)


def _backward(ctx, g_lp, g_ent, _g_lse, _g_cache):
    hidden, weight, bias, targets, lse, ent, cache = ctx.saved_tensors
    temperature, ignore_index, entropy, backend = ctx.args
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if g_lp is None:
        g_lp = torch.zeros_like(lse)
    if g_ent is None or not entropy:
        g_ent = torch.zeros_like(lse)
    dh, dw, db = _lp_bwd_op(g_lp, g_ent, hidden, weight, bias, targets, lse, ent, cache, temperature,
                            ignore_index, entropy, backend, need_h, need_w, bool(need_b and bias is not None))
    return (dh if need_h else None, dw if need_w else None, db if need_b else None,
            None, None, None, None, None, None)


_lp_op.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------- public API
def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    bias: torch.Tensor | None = None, *, temperature: float = 1.0, ignore_index: int = -100,
                    return_entropy: bool = False, backend: str | None = None):
    """log_softmax((hidden @ weight.T + bias) / temperature)[targets], without materialising logits.

    hidden [..., d] and weight [V, d] in float32/bfloat16/float16 (float64 runs the torch path),
    targets [...] int64. Returns float32 logprobs shaped like targets, and the entropy as well when
    return_entropy=True. Targets equal to ignore_index give 0 (and 0 entropy) with zero gradient.
    Differentiable with respect to hidden, weight and bias through both outputs.
    backend: None picks triton on CUDA, else the chunked torch path; or force "triton"/"torch".
    """
    _checks.linear_inputs(hidden, weight, bias)
    t = _checks.targets(targets, "hidden", hidden, weight.shape[0], ignore_index)
    temperature = _checks.temperature(temperature)
    b = pick_backend(backend, hidden.device, supported=_SUPPORTED, op="linear_logprobs")
    if hidden.dtype == torch.float64 or weight.dtype == torch.float64:
        if backend == "triton":
            raise ValueError("linear_logprobs: backend 'triton' does not take float64 inputs")
        b = "torch"
    ct = vt.common_dtype(hidden, weight, bias)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    h2, w2 = h2.to(ct), weight.to(ct)
    b2 = bias.to(ct) if bias is not None else None
    save = vt.needs_grad(hidden, weight, bias)
    lp, ent, _, _ = _lp_op(h2, w2, b2, t, temperature, int(ignore_index), bool(return_entropy), b, save)
    lp = lp.reshape(targets.shape)
    if return_entropy:
        return lp, ent.reshape(targets.shape)
    return lp