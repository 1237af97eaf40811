"""paged_attention: causal attention of packed new queries over a paged KV cache.

One op covers prefill (context == q_len), extend (context > q_len > 1) and decode (q_len == 1),
mixed freely in one batch. Sequence b owns queries q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]; they are
its last q_len_b positions (their K/V are already in the cache), so query i sits at position
context_lens[b] - q_len_b + i and attends to cache positions <= its own. Position p of sequence b
lives in block block_tables[b, p // block_size] at offset p % block_size.

Backends: "triton" (GPU, or the CPU interpreter) and "torch" (the CPU path: `TorchPlan`, built once per
engine step and shared by every layer, holds the gather indices and masks). `paged_attention_reference`
is the plain float32 reference the tests hold both to.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from score_kernels import _aot, _checks
from score_kernels._backend import INTERPRET, pick_backend
from score_kernels._triton_utils import HAVE_TRITON, tl, triton
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

    Sequences with the same q_len (all decode rows; the samples of one extend; equal-length prompts) run
    as one batched SDPA over their gathered blocks, with a causal mask aligned to each context's end.
    """
    nq, hq, d = q.shape
    hkv = k_cache.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(nq, hq, d, dtype=q.dtype, device=q.device)
    cu = cu_seqlens_q.tolist()
    ctx = context_lens.tolist()
    groups: dict[int, list[int]] = {}
    for b in range(len(ctx)):
        if cu[b + 1] > cu[b]:
            groups.setdefault(cu[b + 1] - cu[b], []).append(b)
    dev = q.device
    for ql, seqs in groups.items():
        idx = torch.tensor(seqs, device=dev)
        lmax = max(ctx[b] for b in seqs)
        tables = block_tables.index_select(0, idx)
        k = _gather(k_cache, tables, lmax).to(ct).transpose(1, 2)  # [n, Hkv, L, D]
        v = _gather(v_cache, tables, lmax).to(ct).transpose(1, 2)
        rows = (torch.tensor([cu[b] for b in seqs], device=dev)[:, None] + torch.arange(ql, device=dev)).reshape(-1)
        qg = q.index_select(0, rows).to(ct).reshape(len(seqs), ql, hq, d).transpose(1, 2)  # [n, Hq, ql, D]
        qpos = context_lens.index_select(0, idx).to(dev).long()[:, None] - ql + torch.arange(ql, device=dev)
        mask = torch.arange(lmax, device=dev)[None, None, :] <= qpos[:, :, None]  # [n, ql, L]
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=hq != hkv)
        out.index_copy_(0, rows, o.transpose(1, 2).reshape(-1, hq, d).to(q.dtype))
    return out


# ----------------------------------------------------------------------------- torch (the CPU path)
_WS: dict = {}


def _workspace(name: str, shape, dtype, device) -> torch.Tensor:
    """A reused CPU buffer: gathering into fresh multi-MB tensors every layer costs more in page faults
    than the copy itself."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    n = math.prod(shape)
    buf = _WS.get((name, dtype))
    if buf is None or buf.numel() < n:
        # never an inference tensor (the engine runs under inference_mode): a later call outside it could not write one
        with torch.inference_mode(False):
            buf = _WS[(name, dtype)] = torch.empty(int(n * 1.25) + 1, dtype=dtype)
    return buf[:n].view(shape)


class TorchPlan:
    """The torch backend's view of one batch (block tables, context and query lengths), built once and
    reused by every layer. Decode rows gather whole blocks (index_select of contiguous block rows is
    faster than gathering token slots) and share a masked SDPA call per bucket of similar context length
    (one bucket would pad every row to the longest context); the other sequences (prefill / extend) run
    one SDPA each over their own context."""

    def __init__(self, block_tables: torch.Tensor, context_lens, cu_seqlens_q, block_size: int):
        dev = block_tables.device
        ctx = context_lens.tolist() if isinstance(context_lens, torch.Tensor) else list(context_lens)
        starts = cu_seqlens_q.tolist() if isinstance(cu_seqlens_q, torch.Tensor) else list(cu_seqlens_q)
        q_lens = [e - s for s, e in itertools.pairwise(starts)]
        nblk = [-(-c // block_size) for c in ctx]
        # entries past a sequence's blocks may be junk: point them at block 0 (masked out below)
        width = block_tables.shape[1]
        used = torch.arange(width, device=dev)[None, :] < torch.tensor(nblk, device=dev)[:, None]
        self.bt = torch.where(used, block_tables.long(), 0)
        self.bs, self.ctx_lens = block_size, ctx
        dec = sorted((b for b, ql in enumerate(q_lens) if ql == 1), key=lambda b: -ctx[b])
        self.num_dec = len(dec)
        self.buckets = []  # (rows or None for all, blocks [Bd * nb], mask [Bd, 1, 1, L], (Bd, L))
        while dec:
            top = nblk[dec[0]]
            k = next((i for i, b in enumerate(dec) if nblk[b] < 0.7 * top), len(dec))
            if len(dec) - k < 8:  # not worth another call
                k = len(dec)
            part, dec = dec[:k], dec[k:]
            c = torch.tensor([ctx[b] for b in part], device=dev)
            j = torch.arange(top * block_size, device=dev)
            everyone = len(part) == len(q_lens) and part == list(range(len(q_lens)))
            rows = None if everyone else torch.tensor([starts[b] for b in part], device=dev, dtype=torch.int64)
            blocks = self.bt[torch.tensor(part, device=dev), :top].reshape(-1)
            self.buckets.append((rows, blocks, (j[None, :] < c[:, None])[:, None, None, :], (len(part), top * block_size)))
        self.other = [(b, starts[b], starts[b + 1]) for b, ql in enumerate(q_lens) if ql > 1]


def _torch_paged_attention(q, k_cache, v_cache, plan: TorchPlan, scale: float) -> torch.Tensor:
    gqa = q.shape[1] != k_cache.shape[2]
    out = torch.empty_like(q) if plan.other or plan.num_dec != q.shape[0] else None
    for bucket in plan.buckets:
        o = _torch_decode(q, k_cache, v_cache, bucket, scale, gqa)
        if bucket[0] is None:
            out = o
        else:
            if out is None:
                out = torch.empty_like(q)
            out.index_copy_(0, bucket[0], o)
    if out is None:
        out = torch.zeros_like(q)
    for b, s, e in plan.other:
        ql, cl = e - s, plan.ctx_lens[b]
        blocks = plan.bt[b, : -(-cl // plan.bs)]
        kk = k_cache.index_select(0, blocks).flatten(0, 1)[:cl].transpose(0, 1)  # [Hkv, cl, D]
        vv = v_cache.index_select(0, blocks).flatten(0, 1)[:cl].transpose(0, 1)
        qq = q[s:e].transpose(0, 1)
        if ql == cl:
            o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            qpos = torch.arange(cl - ql, cl, device=q.device)
            m = torch.arange(cl, device=q.device)[None, :] <= qpos[:, None]
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=m, scale=scale, enable_gqa=gqa)
        out[s:e] = o.transpose(0, 1)
    return out


def _torch_decode(q, k_cache, v_cache, bucket, scale, gqa) -> torch.Tensor:
    """[Bd, Hq, D] for one bucket of decode rows."""
    rows, blocks, mask, (bd, lp) = bucket
    qd = q if rows is None else q.index_select(0, rows)
    shape = (blocks.numel(), *k_cache.shape[1:])
    kbuf = _workspace("k", shape, k_cache.dtype, k_cache.device)
    vbuf = _workspace("v", shape, v_cache.dtype, v_cache.device)
    kk = torch.index_select(k_cache, 0, blocks, out=kbuf).view(bd, lp, *k_cache.shape[2:]).transpose(1, 2)
    vv = torch.index_select(v_cache, 0, blocks, out=vbuf).view(bd, lp, *v_cache.shape[2:]).transpose(1, 2)
    return F.scaled_dot_product_attention(qd[:, :, None, :], kk, vv, attn_mask=mask, scale=scale,
                                          enable_gqa=gqa)[:, :, 0, :]


# ----------------------------------------------------------------------------- triton
# One program = one tile of BLOCK_Q consecutive queries of one sequence x the GROUP query heads that
# share one kv head (rows r -> query r // GROUP, head r % GROUP), x one split of the key range.
# Sequence b owns tiles [cu[b] // BLOCK_Q + b, cu[b+1] // BLOCK_Q + b + 1) (exactly [cu[b], cu[b+1])
# when BLOCK_Q == 1), so the grid size follows from shapes alone (no host sync, CUDA-graph safe) and a
# program finds its sequence by binary search over cu_seqlens_q.
if HAVE_TRITON:

    @triton.jit
    def _tile_start(cu_ptr, b, BLOCK_Q: tl.constexpr):
        start = tl.load(cu_ptr + b)
        if BLOCK_Q > 1:
            start = start // BLOCK_Q + b
        return start

    @triton.jit
    def _paged_attn_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, part_acc_ptr, part_ml_ptr, bt_ptr, ctx_ptr, cu_ptr,
        scale_log2, n_seqs, search_iters, n_q, n_q_heads, kv_chunk,
        stride_qt, stride_qh, stride_kb, stride_ko, stride_kh, stride_vb, stride_vo, stride_vh,
        stride_ot, stride_oh, stride_bt,
        BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr,
        UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        lo = tl.full([], 0, tl.int32)
        hi = tl.full([], 0, tl.int32) + n_seqs
        for _ in range(search_iters):
            mid = (lo + hi) // 2
            right = _tile_start(cu_ptr, mid, BLOCK_Q) <= pid
            lo = tl.where(right, mid, lo)
            hi = tl.where(right, hi, mid)
        b = lo
        q_start = tl.load(cu_ptr + b)
        q_len = tl.load(cu_ptr + b + 1) - q_start
        ctx = tl.load(ctx_ptr + b)
        q0 = (pid - _tile_start(cu_ptr, b, BLOCK_Q)) * BLOCK_Q
        if q0 >= q_len:
            return

        r = tl.arange(0, BLOCK_M)
        qi = q0 + r // GROUP
        head = kvh * GROUP + r % GROUP
        row_ok = (r < BLOCK_Q * GROUP) & (qi < q_len)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        tok = (q_start + qi).to(tl.int64)
        q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        q = q.to(k_ptr.dtype.element_ty)
        if UPCAST:
            q = q.to(tl.float32)
        q_pos = ctx - q_len + qi
        kv_stop = ctx - q_len + tl.minimum(q0 + BLOCK_Q, q_len)  # causal bound of the tile's last query
        kv_lo = split * kv_chunk
        kv_hi = tl.minimum(kv_stop, kv_lo + kv_chunk)

        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        n = tl.arange(0, BLOCK_N)
        for start in range(kv_lo, kv_hi, BLOCK_N):
            pos = start + n
            p_ok = pos < kv_hi
            blk = tl.load(bt_ptr + b.to(tl.int64) * stride_bt + pos // BLOCK_SIZE, mask=p_ok, other=0).to(tl.int64)
            off = pos % BLOCK_SIZE
            kv_ok = p_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + (blk * stride_kb + off * stride_ko + kvh * stride_kh)[:, None] + d[None, :],
                        mask=kv_ok, other=0.0)
            v = tl.load(v_ptr + (blk * stride_vb + off * stride_vo + kvh * stride_vh)[:, None] + d[None, :],
                        mask=kv_ok, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            if IEEE:
                qk = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
            ok = p_ok[None, :] & (pos[None, :] <= q_pos[:, None])
            qk = tl.where(ok, qk * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        if SPLIT:
            # unnormalised partials; _paged_attn_reduce_kernel merges the splits
            prow = (split.to(tl.int64) * n_q + tok) * n_q_heads + head
            tl.store(part_acc_ptr + prow[:, None] * BLOCK_D + d[None, :], acc, mask=row_ok[:, None])
            tl.store(part_ml_ptr + prow * 2, m_i, mask=row_ok)
            tl.store(part_ml_ptr + prow * 2 + 1, l_i, mask=row_ok)
        else:
            o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _paged_attn_reduce_kernel(part_acc_ptr, part_ml_ptr, out_ptr, n_splits, n_q, n_q_heads,
                                  stride_ot, stride_oh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                  BLOCK_S: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        hd = tl.program_id(1)
        s = tl.arange(0, BLOCK_S)
        s_ok = s < n_splits
        prow = (s.to(tl.int64) * n_q + t) * n_q_heads + hd
        m = tl.load(part_ml_ptr + prow * 2, mask=s_ok, other=-1.0e30)
        l = tl.load(part_ml_ptr + prow * 2 + 1, mask=s_ok, other=0.0)
        w = tl.exp2(m - tl.max(m, 0))
        d = tl.arange(0, BLOCK_D)
        acc = tl.load(part_acc_ptr + prow[:, None] * BLOCK_D + d[None, :], mask=s_ok[:, None], other=0.0)
        den = tl.sum(l * w, 0)
        o = tl.sum(acc * w[:, None], 0) / tl.where(den > 0, den, 1.0)
        tl.store(out_ptr + t * stride_ot + hd * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)

    _TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

    def _register_aot():
        for dt in ("bf16",):
            for hd in (64, 128):
                for grp, decode, many in ((1, False, True), (7, False, True), (7, True, True), (7, True, False),
                                          (4, True, True)):
                    cfg = _config(grp, hd, decode, torch.bfloat16, interpret=False, many=many)
                    sig = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "out_ptr": f"*{dt}",
                           "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "bt_ptr": "*i32", "ctx_ptr": "*i32",
                           "cu_ptr": "*i32", "scale_log2": "fp32"}
                    for a in ("n_seqs", "search_iters", "n_q", "n_q_heads", "kv_chunk", "stride_qt", "stride_qh",
                              "stride_kb", "stride_ko", "stride_kh", "stride_vb", "stride_vo", "stride_vh",
                              "stride_ot", "stride_oh", "stride_bt"):
                        sig[a] = "i32"
                    consts = dict(cfg["constexprs"], BLOCK_SIZE=16, SPLIT=not many)
                    for c in consts:
                        sig[c] = "constexpr"
                    # decode tiles have GROUP rows (padded to 16): too few for wgmma's 64-row tiles, and
                    # decode is bandwidth-bound, so only the prefill/extend tiles must hit tensor cores
                    kind = "prefill" if not decode else "decode" if many else "decode_split"
                    _aot.register(f"paged_attention[{dt},D={hd},G={grp},{kind}]",
                                  _paged_attn_kernel, sig, consts, num_warps=cfg["num_warps"],
                                  num_stages=cfg["num_stages"], has_dot=not decode)
            _aot.register(f"paged_attention_reduce[{dt}]", _paged_attn_reduce_kernel,
                          {"part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "out_ptr": f"*{dt}", "n_splits": "i32",
                           "n_q": "i32", "n_q_heads": "i32", "stride_ot": "i32", "stride_oh": "i32",
                           "HEAD_DIM": "constexpr", "BLOCK_D": "constexpr", "BLOCK_S": "constexpr"},
                          {"HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_S": 32})


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _config(grp: int, head_dim: int, decode: bool, dtype: torch.dtype, interpret: bool,
            many: bool = True) -> dict:
    """Tile shape: decode tiles hold one query x GROUP heads; prefill/extend tiles about 64 rows.
    Decode with >= 2 programs per SM: D=64 is fastest with 32-key steps and 2 warps, D=128 with 64 and 4
    (H100 timings: docs/paged-kernels.md, "Measured"). `many` is False when the decode grid is small
    (split-K), where 64-key steps and 4 warps win."""
    block_d = max(16, _next_pow2(head_dim))
    if decode:
        block_q = 1
        block_m = max(16, _next_pow2(grp))
        small_d = block_d <= 64 and many
        block_n, warps, stages = (32, 2, 2) if small_d else (64, 4, 2)
    else:
        block_q = max(1, 64 // grp)
        block_m = max(16, _next_pow2(block_q * grp))
        block_n, warps, stages = (64 if block_d <= 64 else 32), 4, 3
    if interpret:
        block_n = 16
    return {"block_q": block_q, "num_warps": warps, "num_stages": stages,
            "constexprs": {"GROUP": grp, "BLOCK_Q": block_q, "BLOCK_M": block_m, "BLOCK_N": block_n,
                           "HEAD_DIM": head_dim, "BLOCK_D": block_d, "UPCAST": interpret,
                           "IEEE": dtype == torch.float32}}


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: small, so that tests exercise split-K on small batches
    if device.index not in _SM_COUNT:
        _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device.index]


def _triton_paged_attention(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale,
                            num_splits: int | None = None):
    if q.dtype == torch.float64 or k_cache.dtype == torch.float64:
        raise ValueError("paged_attention: the triton backend does not take float64; use backend='torch'")
    nq, hq, d = q.shape
    bsz = context_lens.shape[0]
    hkv, block_size = k_cache.shape[2], k_cache.shape[1]
    grp = hq // hkv
    out = torch.empty_like(q)
    if nq == 0 or bsz == 0:
        return out
    decode = nq <= bsz  # average q_len <= 1: one-query tiles
    sms = _sm_count(q.device)
    many = not decode or nq * hkv >= 2 * sms
    cfg = _config(grp, d, decode, k_cache.dtype, INTERPRET, many)
    block_q = cfg["block_q"]
    block_n = cfg["constexprs"]["BLOCK_N"]
    n_tiles = nq if block_q == 1 else nq // block_q + bsz
    max_ctx = block_tables.shape[1] * block_size  # static bound: no host sync on context_lens
    if num_splits is None:
        num_splits = 1
        if not many:  # too few programs to fill the GPU: split the keys (flash-decoding)
            num_splits = max(1, min(-(-2 * sms // (n_tiles * hkv)), -(-max_ctx // (4 * block_n)), 32))
    kv_chunk = -(-max_ctx // num_splits)
    kv_chunk = -(-kv_chunk // block_n) * block_n
    num_splits = max(1, -(-max_ctx // kv_chunk))
    split = num_splits > 1
    if split:
        bd = cfg["constexprs"]["BLOCK_D"]
        part_acc = torch.empty(num_splits, nq, hq, bd, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(num_splits, nq, hq, 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    bt = block_tables if block_tables.dtype == torch.int32 else block_tables.to(torch.int32)
    ctx = context_lens if context_lens.dtype == torch.int32 else context_lens.to(torch.int32)
    cu = cu_seqlens_q if cu_seqlens_q.dtype == torch.int32 else cu_seqlens_q.to(torch.int32)
    if q.stride(2) != 1:
        q = q.contiguous()
    _paged_attn_kernel[(n_tiles, hkv, num_splits)](
        q, k_cache, v_cache, out, part_acc, part_ml, bt, ctx, cu,
        float(scale) * 1.4426950408889634, bsz, max(1, bsz.bit_length()), nq, hq, kv_chunk,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), bt.stride(0),
        BLOCK_SIZE=block_size, SPLIT=split, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **cfg["constexprs"])
    if split:
        _paged_attn_reduce_kernel[(nq, hq)](
            part_acc, part_ml, out, num_splits, nq, hq, out.stride(0), out.stride(1),
            HEAD_DIM=d, BLOCK_D=cfg["constexprs"]["BLOCK_D"], BLOCK_S=max(2, _next_pow2(num_splits)))
    return out


if HAVE_TRITON:
    _register_aot()


# ----------------------------------------------------------------------------- torch.library
def _impl(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale, backend):
    if backend == "triton":
        return _triton_paged_attention(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale)
    plan = TorchPlan(block_tables, context_lens, cu_seqlens_q, k_cache.shape[1])
    return _torch_paged_attention(q, k_cache, v_cache, plan, scale)


@torch.library.custom_op("score::paged_attention", mutates_args=())
def _paged_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, scale: float,
                        backend: str) -> torch.Tensor:
    return _impl(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale, backend)


@_paged_attention_op.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale, backend):
    return torch.empty_like(q)


# ----------------------------------------------------------------------------- public API
def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, *, scale: float | None = None,
                    backend: str | None = None, plan: TorchPlan | None = None) -> torch.Tensor:
    """Attention of packed queries q [Nq, Hq, D] of B sequences over the paged cache.

    k_cache, v_cache: [num_blocks, block_size, Hkv, D] (Hq % Hkv == 0); block_tables [B, max_blocks]
    int32; context_lens [B]: tokens of each sequence in the cache including its new queries;
    cu_seqlens_q [B+1]. Returns [Nq, Hq, D] in q's dtype (fp32 accumulation). scale defaults to D**-0.5.

    backend: None picks triton on CUDA tensors and torch on CPU tensors; or force one.
    plan: for the torch backend, a `TorchPlan` of these same tables, so that the layers of one forward
    share one (built per call otherwise).
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
    if b == "torch" and plan is not None:
        return _torch_paged_attention(q, k_cache, v_cache, plan, float(scale))
    return _paged_attention_op(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, float(scale), b)
