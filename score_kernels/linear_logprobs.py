"""linear_logprobs: log-probabilities (and entropy) of target tokens straight from hidden states.

    logits   = (hidden @ weight.T + bias) / temperature
    logprobs = log_softmax(logits)[target]
    entropy  = -sum_v p_v log p_v

The [tokens, vocab] logits are never materialised in full:
- "triton" (GPU; the CPU interpreter in tests), impl="fused" (default): the forward kernel tiles
  tokens x vocab, runs tl.dot into fp32 accumulators and merges log-sum-exp online, storing only
  per-token statistics (lse, target logit, entropy). The backward kernel recomputes logits tile by
  tile for one vocab slice at a time and writes dz for that slice; dweight[slice] = dz.T @ hidden is
  then complete in one GEMM (fp32 accumulation inside the GEMM, no cross-slice accumulation) and
  dhidden accumulates over slices in an fp32 buffer.
- "triton", impl="gemm": the same algebra with every GEMM in cuBLAS (fp32 logits chunks from bf16
  operands) and memory-bound Triton epilogues for the statistics and dz (this file's kernels).
- "torch" (CPU, any device): token chunks sized from a memory budget, fp32 GEMMs through torch
  (MKL/cuBLAS), an analytic backward without autograd through the chunks. Logits of the first
  chunks are kept from forward to backward while they fit a second budget, which saves their
  recomputation; the rest are recomputed.

Tokens whose target equals ignore_index are compacted away before any GEMM: they cost nothing and
get logprob 0, entropy 0 and exactly zero gradient.

The fused Triton kernels (shared with linear_kl through the KL constexpr), the budgets and the chunk
pieces live in score_kernels/_vocab_tiles.py.
"""
from __future__ import annotations

import torch

from score_kernels import _aot, _checks
from score_kernels import _vocab_tiles as vt
from score_kernels._backend import INTERPRET, pick_backend
from score_kernels._triton_utils import HAVE_TRITON, tl, triton

_SUPPORTED = ("triton", "torch")
IMPLS = ("fused", "gemm")  # triton backend: fused tl.dot kernels, or cuBLAS GEMMs + Triton epilogues


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



# ----------------------------------------------------------------------------- impl="gemm": cuBLAS + epilogues
# Per vocab chunk [v0, v0 + W): cuBLAS writes the fp32 logits h @ W_chunk.T into a reused buffer
# (bf16 operands, fp32 result), then a memory-bound Triton epilogue reads them once. Forward: the
# epilogue merges the chunk into per-token running statistics. Backward: the chunk is recomputed by
# cuBLAS, the epilogue writes dz in the input dtype, and two more cuBLAS GEMMs give dweight[chunk]
# (complete, written once) and dhidden (fp32 accumulation across chunks). All 8NdV FLOPs run in
# cuBLAS; the epilogues move 8 + 10 bytes per logit (docs/fused-logprobs.md has the arithmetic).
if HAVE_TRITON:

    @triton.jit
    def _chunk_stats_kernel(z_ptr, b_ptr, t_ptr, m_ptr, s_ptr, a_ptr, x_ptr, zc_ptr, N, W, v0, stride_z, inv_t,
                            HAS_BIAS: tl.constexpr, ENTROPY: tl.constexpr, CACHE: tl.constexpr,
                            BN: tl.constexpr, BV: tl.constexpr):
        """Merges logits z [N, W] of vocab columns [v0, v0 + W) into the running per-token max m,
        s = sum exp(z - m), a = sum exp(z - m) (z - m) (entropy) and x = target logit.
        CACHE: also keeps z in zc's dtype (same layout) for the backward, in the same pass."""
        rows = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
        rmask = rows < N
        m = tl.load(m_ptr + rows, mask=rmask, other=float("-inf"))
        s = tl.load(s_ptr + rows, mask=rmask, other=0.0)
        x = tl.load(x_ptr + rows, mask=rmask, other=0.0)
        a = tl.load(a_ptr + rows, mask=rmask & ENTROPY, other=0.0)
        tgt = tl.load(t_ptr + rows, mask=rmask, other=-1) - v0
        for c0 in range(0, W, BV):
            cols = c0 + tl.arange(0, BV)
            cmask = cols < W
            offs = rows[:, None] * stride_z + cols[None, :]
            z = tl.load(z_ptr + offs, mask=rmask[:, None] & cmask[None, :], other=0.0)
            if CACHE:
                tl.store(zc_ptr + offs, z.to(zc_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
            if HAS_BIAS:
                z += tl.load(b_ptr + v0 + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            z = tl.where(cmask[None, :], z * inv_t, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, 1))  # finite: every tile has a valid column
            alpha = tl.exp(m - m_new)
            e = tl.exp(z - m_new[:, None])
            if ENTROPY:  # a relative to the running max, as in the fused kernel
                shift = (tl.where(s > 0, m, m_new) - m_new) * s
                a = alpha * (a + shift) + tl.sum(e * tl.where(e > 0, z - m_new[:, None], 0.0), 1)
            x += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
            s = s * alpha + tl.sum(e, 1)
            m = m_new
        tl.store(m_ptr + rows, m, mask=rmask)
        tl.store(s_ptr + rows, s, mask=rmask)
        tl.store(x_ptr + rows, x, mask=rmask)
        if ENTROPY:
            tl.store(a_ptr + rows, a, mask=rmask)

    @triton.jit
    def _chunk_dz_kernel(z_ptr, b_ptr, t_ptr, lse_ptr, c_ptr, g_ptr, ge_ptr, dz_ptr, N, W, v0, stride_z,
                         stride_dz, inv_t, HAS_BIAS: tl.constexpr, ENTROPY: tl.constexpr, BN: tl.constexpr,
                         BV: tl.constexpr):
        """dz = (g (onehot - p) - ge p (lsm + H)) * inv_t for logits z [N, W] of vocab columns
        [v0, v0 + W) (fp32 from the GEMM, or a cached copy in the input dtype), stored in dz's dtype;
        the one-hot term is added in fp32 before rounding."""
        rows = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
        cols = tl.program_id(1).to(tl.int64) * BV + tl.arange(0, BV)
        rmask = rows < N
        cmask = cols < W
        mask = rmask[:, None] & cmask[None, :]
        z = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(b_ptr + v0 + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
        lsm = z * inv_t - lse[:, None]
        p = tl.exp(lsm)
        dz = -g[:, None] * p
        if ENTROPY:
            ge = tl.load(ge_ptr + rows, mask=rmask, other=0.0)
            c = tl.load(c_ptr + rows, mask=rmask, other=0.0)
            dz -= tl.where(p > 0, ge[:, None] * p * (lsm + c[:, None]), 0.0)
        tgt = tl.load(t_ptr + rows, mask=rmask, other=-1) - v0
        dz += tl.where(cols[None, :] == tgt[:, None], g[:, None], 0.0)
        tl.store(dz_ptr + rows[:, None] * stride_dz + cols[None, :], (dz * inv_t).to(dz_ptr.dtype.element_ty),
                 mask=mask)

    # Memory-bound tiles: 16 x 256 fp32 is 16 values per thread at 8 warps, 1024 programs at N=16384.
    # At 4 warps the stats kernel took 168-204 registers (sm_90/sm_80), at 8 warps 80-122. Not timed.
    EPILOGUE_CONFIG = {"BN": 16, "BV": 256, "num_warps": 8}

    def _epilogue_sig(kind: str, dt: str, zdt: str) -> dict:
        sig = {"z_ptr": f"*{zdt}", "b_ptr": f"*{dt}", "t_ptr": "*i64"}
        if kind == "stats":
            sig.update({k: "*fp32" for k in ("m_ptr", "s_ptr", "a_ptr", "x_ptr")})
            sig.update({"zc_ptr": f"*{dt}", "N": "i64", "W": "i64", "v0": "i64", "stride_z": "i64", "inv_t": "fp32"})
        else:
            sig.update({k: "*fp32" for k in ("lse_ptr", "c_ptr", "g_ptr", "ge_ptr")})
            sig.update({"dz_ptr": f"*{dt}", "N": "i64", "W": "i64", "v0": "i64", "stride_z": "i64",
                        "stride_dz": "i64", "inv_t": "fp32"})
        for k in ("HAS_BIAS", "ENTROPY") + (("CACHE",) if kind == "stats" else ()) + ("BN", "BV"):
            sig[k] = "constexpr"
        return sig

    # (dtype, cached): the cached variants (GPU_CACHE_BYTES > 0) write / read the low-precision copy.
    for _dt, _cached in (("bf16", False), ("fp16", False), ("fp32", False), ("bf16", True), ("fp16", True)):
        for _ent, _bias in ((True, False), (False, True)):
            _tag = f"{_dt}{',ent' if _ent else ''}{',bias' if _bias else ''}{',cached' if _cached else ''}"
            _ce = {"HAS_BIAS": _bias, "ENTROPY": _ent, "BN": EPILOGUE_CONFIG["BN"], "BV": EPILOGUE_CONFIG["BV"]}
            _launch = {"num_warps": EPILOGUE_CONFIG["num_warps"], "num_stages": 1}
            _aot.register(f"linear_logprobs_gemm_stats[{_tag}]", _chunk_stats_kernel,
                          _epilogue_sig("stats", _dt, "fp32"), {**_ce, "CACHE": _cached}, **_launch)
            _aot.register(f"linear_logprobs_gemm_dz[{_tag}]", _chunk_dz_kernel,
                          _epilogue_sig("dz", _dt, _dt if _cached else "fp32"), _ce, **_launch)


def _epilogue_config() -> dict:
    if INTERPRET:  # the interpreter pays per op, not per element: few big tiles
        return {"BN": 32, "BV": 128, "num_warps": 4}
    return dict(EPILOGUE_CONFIG)


def _chunk_cols(n: int, V: int, bv: int) -> int:
    """Vocab columns per chunk: the fp32 [n, W] logits chunk fits GPU_CHUNK_BYTES, W a multiple of bv."""
    return min(V, max(bv, vt.GPU_CHUNK_BYTES // max(1, n * 4) // bv * bv))


def _cached_chunks(n: int, cols: int, n_chunks: int, dtype: torch.dtype) -> int:
    """How many leading chunks keep their logits (in the input dtype) for the backward."""
    if dtype == torch.float32:  # a copy as big as the fp32 chunk saves one GEMM of it, no gain in bytes
        return 0
    return min(n_chunks, vt.GPU_CACHE_BYTES // max(1, n * cols * 2))


def gemm_forward_stats(h, w, b, t, inv_t, *, entropy, save=False):
    """impl="gemm" forward: (lse, lp, ent or None, cache), fp32 [n], for valid targets t. With save,
    cache [k * n, cols] holds the logits of the first k chunks in h's dtype (chunk i in rows
    i*n..(i+1)*n, a partial last chunk packed at the start of its block), else it is empty."""
    n, V = h.shape[0], w.shape[0]
    cfg = _epilogue_config()
    cols = _chunk_cols(n, V, cfg["BV"])
    k = _cached_chunks(n, cols, triton.cdiv(V, cols), h.dtype) if save else 0
    f32 = {"dtype": torch.float32, "device": h.device}
    z_buf = torch.empty(n * cols, **f32)
    cache = torch.empty(k * n, cols, dtype=h.dtype, device=h.device)
    m = torch.full((n,), float("-inf"), **f32)
    s, a, x = (torch.zeros(n, **f32) for _ in range(3))
    for i, v0 in enumerate(range(0, V, cols)):
        width = min(V, v0 + cols) - v0
        z = vt.mm_f32(h, w[v0:v0 + width].t(), z_buf[: n * width].view(n, width))
        zc = cache[i * n:(i + 1) * n].view(-1)[: n * width] if i < k else h  # h: unused, typed like the cache
        _chunk_stats_kernel[(triton.cdiv(n, cfg["BN"]),)](
            z, b if b is not None else h, t, m, s, a, x, zc, n, width, v0, z.stride(0), inv_t,
            HAS_BIAS=b is not None, ENTROPY=entropy, CACHE=i < k, **cfg)
    logs = torch.log(s)
    lp = (x - m) - logs  # not x - lse: lse rounds at the scale of |m|
    return m + logs, lp, (logs - a / s) if entropy else None, cache


def gemm_backward(h, w, b, t, lse, ent, g, ge, inv_t, need_h, need_w, need_b, cache=None):
    """impl="gemm" backward: (dh fp32 or None, dw in w.dtype or None, db fp32 or None). Chunks held
    in cache (from gemm_forward_stats) skip their recompute GEMM."""
    n, d = h.shape
    V = w.shape[0]
    cfg = _epilogue_config()
    k = cache.shape[0] // n if cache is not None and cache.numel() else 0
    cols = cache.shape[1] if k else _chunk_cols(n, V, cfg["BV"])
    z_buf = torch.empty(n * cols, dtype=torch.float32, device=h.device)
    dz_buf = torch.empty(n * cols, dtype=h.dtype, device=h.device)
    dh = torch.zeros(n, d, dtype=torch.float32, device=h.device) if need_h else None
    dw = torch.empty_like(w) if need_w else None
    db = torch.empty(V, dtype=torch.float32, device=h.device) if need_b else None
    for i, v0 in enumerate(range(0, V, cols)):
        v1 = min(V, v0 + cols)
        width = v1 - v0
        if i < k:
            z = cache[i * n:(i + 1) * n].view(-1)[: n * width].view(n, width)
        else:
            z = vt.mm_f32(h, w[v0:v1].t(), z_buf[: n * width].view(n, width))
        dz = dz_buf[: n * width].view(n, width)
        grid = (triton.cdiv(n, cfg["BN"]), triton.cdiv(width, cfg["BV"]))
        _chunk_dz_kernel[grid](z, b if b is not None else h, t, lse, ent, g, ge if ge is not None else g, dz,
                               n, width, v0, z.stride(0), dz.stride(0), inv_t, HAS_BIAS=b is not None,
                               ENTROPY=ge is not None, **cfg)
        if need_w:
            torch.mm(dz.t(), h, out=dw[v0:v1])
        if need_h:
            vt.addmm_f32_(dh, dz, w[v0:v1])
        if need_b:
            db[v0:v1] = dz.sum(0, dtype=torch.float32)
    return dh, dw, db


# ----------------------------------------------------------------------------- chunked torch path
def torch_forward(h, w, b, t, inv_t, entropy, cache_rows):
    """Chunked forward over token rows. h [n, d], t [n] valid targets. Returns (lp, ent or None,
    lse, cache) where cache [k, V] holds log_softmax of the first k <= cache_rows rows.

    ATen's log_softmax works row by row with the row hot in L2, so it beats separate max / exp /
    sum sweeps over a whole chunk (docs/fused-logprobs.md, "Chunked torch path"); the temperature is
    folded into the small hidden chunk."""
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


def _fwd_impl(h, w, b, t, temperature, ignore_index, entropy, backend, impl, save):
    """Returns (lp [n], ent [n], lse [n], cache); rows of ignored targets are zero. cache: [k, V]
    log-softmax rows (torch), [k * n, cols] logits chunks (impl="gemm"), or empty."""
    n, V = h.shape[0], w.shape[0]
    inv_t = 1.0 / temperature
    idx = _valid_index(t, ignore_index)
    hs, ts = (h, t) if idx is None else (h.index_select(0, idx), t.index_select(0, idx))
    f32 = {"dtype": vt.out_dtype(h), "device": h.device}
    gemm = backend == "triton" and impl == "gemm"
    cache = torch.empty(0, 0, dtype=h.dtype, device=h.device) if gemm else torch.empty(0, V, **f32)
    if hs.shape[0] == 0:
        z = torch.zeros(n, **f32)
        return z, z.clone(), z.clone(), cache
    if gemm:
        lse, lp, ent, cache = gemm_forward_stats(hs.contiguous(), w.contiguous(), b, ts.contiguous(), inv_t,
                                                 entropy=entropy, save=save)
    elif backend == "triton":
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


def _bwd_impl(g, ge, h, w, b, t, lse, ent, cache, temperature, ignore_index, backend, impl, need_h, need_w,
              need_b, entropy):
    inv_t = 1.0 / temperature
    idx = _valid_index(t, ignore_index)
    if idx is not None:
        h, t, g, lse, ent = (x.index_select(0, idx) for x in (h, t, g, lse, ent))
        ge = ge.index_select(0, idx) if ge is not None else None
    ge = ge if entropy else None
    if h.shape[0] == 0:
        dh = dw = db = None
    elif backend == "triton":
        args = (h.contiguous(), w.contiguous(), b, t.contiguous(), lse.contiguous(), ent.contiguous(),
                g.float().contiguous(), ge.float().contiguous() if ge is not None else None,
                inv_t, need_h, need_w, need_b)
        if impl == "gemm":
            dh, dw, db = gemm_backward(*args, cache=cache)
        else:
            dh, dw, db = vt.triton_backward(*args)
    else:
        dh, dw, db = torch_backward(h, w, b, t, lse, ent, cache, g, ge, inv_t, need_h, need_w, need_b)
    return dh, dw, db, idx


# ----------------------------------------------------------------------------- torch.library
@torch.library.custom_op("score::linear_logprobs", mutates_args=())
def _lp_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
           temperature: float, ignore_index: int, entropy: bool, backend: str, impl: str, save: bool
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd_impl(hidden, weight, bias, targets, temperature, ignore_index, entropy, backend, impl, save)


@_lp_op.register_fake
def _(hidden, weight, bias, targets, temperature, ignore_index, entropy, backend, impl, save):
    n, V = hidden.shape[0], weight.shape[0]
    f = hidden.new_empty(n, dtype=vt.out_dtype(hidden))
    ctx = torch.library.get_ctx()
    k = ctx.new_dynamic_size()  # how many rows fit the cache depends on the valid-token count
    if backend == "triton" and impl == "gemm":  # logits chunks: [chunks * tokens, chunk columns]
        return f, f.clone(), f.clone(), hidden.new_empty(k, ctx.new_dynamic_size())
    return f, f.clone(), f.clone(), hidden.new_empty(k, V, dtype=vt.out_dtype(hidden))


@torch.library.custom_op("score::linear_logprobs_backward", mutates_args=())
def _lp_bwd_op(g: torch.Tensor, ge: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None, targets: torch.Tensor, lse: torch.Tensor, ent: torch.Tensor,
               cache: torch.Tensor, temperature: float, ignore_index: int, entropy: bool, backend: str,
               impl: str, need_h: bool, need_w: bool, need_b: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dh, dw, db, idx = _bwd_impl(g, ge, hidden, weight, bias, targets, lse, ent, cache, temperature,
                                ignore_index, backend, impl, need_h, need_w, need_b, entropy)
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
      impl, need_h, need_w, need_b):
    return vt.grad_placeholders(hidden, weight, bias, need_h, need_w, need_b)


def _setup(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, ignore_index, entropy, backend, impl, _save = inputs
    _, _, lse, cache = output
    ent = output[1]
    # Unused outputs must not get materialised zero gradients: the cache alone is [rows, V].
    ctx.mark_non_differentiable(lse, cache)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, weight, bias, targets, lse, ent, cache)
    ctx.args = (temperature, ignore_index, entropy, backend, impl)


def _backward(ctx, g_lp, g_ent, _g_lse, _g_cache):
    hidden, weight, bias, targets, lse, ent, cache = ctx.saved_tensors
    temperature, ignore_index, entropy, backend, impl = ctx.args
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if g_lp is None:
        g_lp = torch.zeros_like(lse)
    if g_ent is None or not entropy:
        g_ent = torch.zeros_like(lse)
    dh, dw, db = _lp_bwd_op(g_lp, g_ent, hidden, weight, bias, targets, lse, ent, cache, temperature,
                            ignore_index, entropy, backend, impl, need_h, need_w, bool(need_b and bias is not None))
    return (dh if need_h else None, dw if need_w else None, db if need_b else None,
            None, None, None, None, None, None, None)


_lp_op.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------- public API
def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    bias: torch.Tensor | None = None, *, temperature: float = 1.0, ignore_index: int = -100,
                    return_entropy: bool = False, backend: str | None = None, impl: str | None = None):
    """log_softmax((hidden @ weight.T + bias) / temperature)[targets], without materialising logits.

    hidden [..., d] and weight [V, d] in float32/bfloat16/float16 (float64 runs the torch path),
    targets [...] int64. Returns float32 logprobs shaped like targets, and the entropy as well when
    return_entropy=True. Targets equal to ignore_index give 0 (and 0 entropy) with zero gradient.
    Differentiable with respect to hidden, weight and bias through both outputs.
    backend: None picks triton on CUDA, else the chunked torch path; or force "triton"/"torch".
    impl (triton backend only): "fused" (default) runs the tl.dot kernels, "gemm" cuBLAS GEMMs per
    vocab chunk with Triton epilogues (docs/fused-logprobs.md compares the two).
    """
    _checks.linear_inputs(hidden, weight, bias)
    t = _checks.targets(targets, "hidden", hidden, weight.shape[0], ignore_index)
    temperature = _checks.temperature(temperature)
    b = pick_backend(backend, hidden.device, supported=_SUPPORTED, op="linear_logprobs")
    if hidden.dtype == torch.float64 or weight.dtype == torch.float64:
        if backend == "triton":
            raise ValueError("linear_logprobs: backend 'triton' does not take float64 inputs")
        b = "torch"
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"linear_logprobs: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "gemm" and b != "triton":
        raise ValueError(f"linear_logprobs: impl 'gemm' runs on the triton backend, not {b!r}")
    impl = impl or "fused"
    ct = vt.common_dtype(hidden, weight, bias)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    h2, w2 = h2.to(ct), weight.to(ct)
    b2 = bias.to(ct) if bias is not None else None
    save = vt.needs_grad(hidden, weight, bias)
    lp, ent, _, _ = _lp_op(h2, w2, b2, t, temperature, int(ignore_index), bool(return_entropy), b, impl, save)
    lp = lp.reshape(targets.shape)
    if return_entropy:
        return lp, ent.reshape(targets.shape)
    return lp