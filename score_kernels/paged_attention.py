"""paged_attention: causal attention of packed new queries over a paged KV cache.

One op covers prefill (context == q_len), extend (context > q_len > 1) and decode (q_len == 1),
mixed freely in one batch. Sequence b owns queries q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]; they are
its last q_len_b positions (their K/V are already in the cache), so query i sits at position
context_lens[b] - q_len_b + i and attends to cache positions <= its own. Position p of sequence b
lives in block block_tables[b, p // block_size] at offset p % block_size.

Backends: "triton" (GPU, or the CPU interpreter) and "torch" (the reference, also the CPU fast path).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from score_kernels import _checks
from score_kernels._backend import pick_backend
from score_kernels.kv_cache import check_caches

_SUPPORTED = ("triton", "torch")


# ----------------------------------------------------------------------------- reference
def _gather(cache: torch.Tensor, table: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """cache rows of one or many sequences: table [..., nblk] -> [..., n_tokens, Hkv, D]."""
    nb, bs = cache.shape[0], cache.shape[1]
    nblk = -(-n_tokens // bs)
    idx = table[..., :nblk].long().clamp(0, nb - 1)  # entries past a sequence's blocks may be junk
    g = cache.index_select(0, idx.reshape(-1))
    return g.reshape(*idx.shape[:-1], nblk * bs, *cache.shape[2:])[..., :n_tokens, :, :]


def paged_attention_reference(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, *,
                              scale: float | None = None) -> torch.Tensor:
    """Pure PyTorch. Computes in float64 for float64 q, else float32; returns q's dtype.

    Decode rows (q_len 1) run as one batched masked attention; prefill/extend rows loop over sequences.
    """
    nq, hq, d = q.shape
    hkv = k_cache.shape[2]
    grp = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(nq, hq, d, dtype=q.dtype, device=q.device)
    cu = cu_seqlens_q.tolist()
    ctx = context_lens.tolist()
    bsz = len(ctx)
    qlens = [cu[b + 1] - cu[b] for b in range(bsz)]
    dec = [b for b in range(bsz) if qlens[b] == 1]
    if dec:
        rows = torch.tensor([cu[b] for b in dec], device=q.device)
        dec_t = torch.tensor(dec, device=q.device)
        lmax = max(ctx[b] for b in dec)
        k = _gather(k_cache, block_tables[dec_t], lmax).to(ct)  # [n, L, Hkv, D]
        v = _gather(v_cache, block_tables[dec_t], lmax).to(ct)
        qd = q.index_select(0, rows).to(ct).reshape(len(dec), hkv, grp, d)
        s = torch.einsum("nhgd,nlhd->nhgl", qd, k) * scale
        valid = torch.arange(lmax, device=q.device)[None, :] < context_lens[dec_t].to(q.device)[:, None]
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
        o = torch.einsum("nhgl,nlhd->nhgd", torch.softmax(s, dim=-1), v)
        out.index_copy_(0, rows, o.reshape(len(dec), hq, d).to(q.dtype))
    for b in range(bsz):
        ql, c = qlens[b], ctx[b]
        if ql == 1 or ql == 0:
            continue
        k = _gather(k_cache, block_tables[b], c).to(ct).transpose(0, 1)  # [Hkv, c, D]
        v = _gather(v_cache, block_tables[b], c).to(ct).transpose(0, 1)
        qb = q[cu[b]:cu[b + 1]].to(ct).transpose(0, 1)  # [Hq, ql, D]
        qpos = torch.arange(c - ql, c, device=q.device)
        mask = torch.arange(c, device=q.device)[None, :] <= qpos[:, None]
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale, enable_gqa=grp > 1)
        out[cu[b]:cu[b + 1]] = o.transpose(0, 1).to(q.dtype)
    return out


# ----------------------------------------------------------------------------- torch.library
def _impl(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale, backend):
    if backend == "triton":
        return _triton_paged_attention(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale)
    return paged_attention_reference(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale=scale)


@torch.library.custom_op("score::paged_attention", mutates_args=())
def _paged_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, scale: float,
                        backend: str) -> torch.Tensor:
    return _impl(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale, backend)


@_paged_attention_op.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale, backend):
    return torch.empty_like(q)


def _triton_paged_attention(*args):  # replaced below once the Triton kernel lands
    raise NotImplementedError


# ----------------------------------------------------------------------------- public API
def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, *, scale: float | None = None,
                    backend: str | None = None) -> torch.Tensor:
    """Attention of packed queries q [Nq, Hq, D] of B sequences over the paged cache.

    k_cache, v_cache: [num_blocks, block_size, Hkv, D] (Hq % Hkv == 0); block_tables [B, max_blocks]
    int32; context_lens [B]: tokens of each sequence in the cache including its new queries;
    cu_seqlens_q [B+1]. Returns [Nq, Hq, D] in q's dtype (fp32 accumulation). scale defaults to D**-0.5.

    backend: None picks triton on CUDA tensors and torch on CPU tensors; or force one.
    """
    check_caches(k_cache, v_cache)
    _checks.tensor("q", q, floating=True, ndim=3)
    _checks.tensor("block_tables", block_tables, integer=True, ndim=2)
    _checks.tensor("context_lens", context_lens, integer=True, ndim=1)
    _checks.tensor("cu_seqlens_q", cu_seqlens_q, integer=True, ndim=1)
    for name, t in (("q", q), ("block_tables", block_tables), ("context_lens", context_lens),
                    ("cu_seqlens_q", cu_seqlens_q)):
        _checks.same_device(name, t, "k_cache", k_cache)
    hq, d = q.shape[1], q.shape[2]
    hkv = k_cache.shape[2]
    if k_cache.shape[3] != d:
        raise ValueError(f"q has head_dim {d} but k_cache has head_dim {k_cache.shape[3]}")
    if hq % hkv != 0:
        raise ValueError(f"q has {hq} heads, not a multiple of k_cache's {hkv} kv heads")
    bsz = context_lens.shape[0]
    if block_tables.shape[0] != bsz:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows but context_lens has {bsz} sequences")
    if cu_seqlens_q.shape[0] != bsz + 1:
        raise ValueError(f"cu_seqlens_q must have B+1 = {bsz + 1} entries, got {cu_seqlens_q.shape[0]}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    b = pick_backend(backend, q.device, supported=_SUPPORTED, op="paged_attention")
    return _paged_attention_op(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, float(scale), b)
