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

The kernels are shared with linear_kl (score_kernels/linear_kl.py) through the KL constexpr.
"""
from __future__ import annotations

import functools
import math
import os

import torch

from score_kernels import _aot, _checks
from score_kernels._backend import INTERPRET, pick_backend
from score_kernels._triton_utils import HAVE_TRITON, tl, triton

_SUPPORTED = ("triton", "torch")
_LOWEST = -3.0e38  # stands in for -inf logits where 0 * -inf would make NaN

# CPU/torch path budgets. WORK: fp32 scratch ([rows, V] chunks forward, [tokens, vocab slice] backward).
# CACHE: logits kept from forward to backward so their GEMM is not recomputed; 0 disables.
WORK_BYTES = int(float(os.environ.get("SCORE_LOGPROBS_WORK_MB", "32")) * 2**20)
CACHE_BYTES = int(float(os.environ.get("SCORE_LOGPROBS_CACHE_MB", "368")) * 2**20)
# GPU backward: bytes of the dz slice [tokens, vocab slice] in the input dtype.
GPU_DZ_BYTES = int(float(os.environ.get("SCORE_LOGPROBS_GPU_DZ_MB", "256")) * 2**20)


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


# ----------------------------------------------------------------------------- triton kernels
if HAVE_TRITON:

    @triton.jit
    def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, D, stride_h, stride_w, inv_t,
                     HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                     BN: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr):
        # (h[rows] @ w[cols].T + b[cols]) * inv_t as an fp32 [BN, BV] tile; rows/cols are int64.
        acc = tl.zeros((BN, BV), dtype=tl.float32)
        for k0 in range(0, D, BK):
            ks = k0 + tl.arange(0, BK)
            km = ks < D
            a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
            b = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None], mask=cmask[None, :] & km[:, None], other=0.0)
            if UPCAST:  # the interpreter's bf16 dot is wrong; on a GPU this stays a bf16 tensor-core dot
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        return acc * inv_t

    @triton.jit
    def _fwd_kernel(h_ptr, w_ptr, b_ptr, t_ptr, rh_ptr, rw_ptr, rb_ptr,
                    m_ptr, s_ptr, a_ptr, x_ptr, rm_ptr, rs_ptr,
                    N, V, D, RD, stride_h, stride_w, stride_rh, stride_rw, inv_t, v_per_split,
                    HAS_BIAS: tl.constexpr, HAS_RBIAS: tl.constexpr, ENTROPY: tl.constexpr, KL: tl.constexpr,
                    UPCAST: tl.constexpr, IEEE: tl.constexpr,
                    BN: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr):
        """Per (token block, vocab split): running max m, sum s = sum exp(z - m), and
        logprobs: a = sum exp(z - m) (z - m) (entropy), x = target logit;
        KL:       a = sum exp(z - m) (z - r), rm/rs = the reference's running max and sum."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
        rmask = rows < N
        v_lo = pid_s.to(tl.int64) * v_per_split
        v_hi = tl.minimum(v_lo + v_per_split, V)
        m = tl.full((BN,), float("-inf"), tl.float32)
        s = tl.zeros((BN,), tl.float32)
        a = tl.zeros((BN,), tl.float32)
        x = tl.zeros((BN,), tl.float32)
        rm = tl.full((BN,), float("-inf"), tl.float32)
        rs = tl.zeros((BN,), tl.float32)
        if not KL:
            tgt = tl.load(t_ptr + rows, mask=rmask, other=-1)
        for v0 in range(v_lo, v_hi, BV):
            cols = v0 + tl.arange(0, BV)
            cmask = cols < v_hi
            z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, D, stride_h, stride_w, inv_t,
                             HAS_BIAS, UPCAST, IEEE, BN, BV, BK)
            z = tl.where(cmask[None, :], z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, 1))  # finite: every tile has a valid column
            alpha = tl.exp(m - m_new)  # exp(-inf) = 0 on the first tile
            e = tl.exp(z - m_new[:, None])
            if KL:
                r = _logits_tile(rh_ptr, rw_ptr, rb_ptr, rows, cols, rmask, cmask, RD, stride_rh, stride_rw, inv_t,
                                 HAS_RBIAS, UPCAST, IEEE, BN, BV, BK)
                r = tl.where(cmask[None, :], r, float("-inf"))
                rm_new = tl.maximum(rm, tl.max(r, 1))
                rs = rs * tl.exp(rm - rm_new) + tl.sum(tl.exp(r - rm_new[:, None]), 1)
                rm = rm_new
                diff = tl.where(cmask[None, :], z - r, 0.0)
                a = a * alpha + tl.sum(e * diff, 1)
            else:
                if ENTROPY:
                    # a is kept relative to the current max: rescaling adds (m - m_new) * s.
                    shift = (tl.where(s > 0, m, m_new) - m_new) * s
                    zc = tl.where(e > 0, z - m_new[:, None], 0.0)
                    a = alpha * (a + shift) + tl.sum(e * zc, 1)
                hit = cols[None, :] == tgt[:, None]
                x += tl.sum(tl.where(hit, z, 0.0), 1)
            s = s * alpha + tl.sum(e, 1)
            m = m_new
        out = pid_s.to(tl.int64) * N + rows
        tl.store(m_ptr + out, m, mask=rmask)
        tl.store(s_ptr + out, s, mask=rmask)
        if KL or ENTROPY:
            tl.store(a_ptr + out, a, mask=rmask)
        if KL:
            tl.store(rm_ptr + out, rm, mask=rmask)
            tl.store(rs_ptr + out, rs, mask=rmask)
        else:
            tl.store(x_ptr + out, x, mask=rmask)

    @triton.jit
    def _bwd_dz_kernel(h_ptr, w_ptr, b_ptr, t_ptr, rh_ptr, rw_ptr, rb_ptr,
                       lse_ptr, c_ptr, g_ptr, ge_ptr, dz_ptr,
                       N, V, D, RD, stride_h, stride_w, stride_rh, stride_rw, inv_t, v_lo, v_hi, stride_dz,
                       HAS_BIAS: tl.constexpr, HAS_RBIAS: tl.constexpr, ENTROPY: tl.constexpr, KL: tl.constexpr,
                       UPCAST: tl.constexpr, IEEE: tl.constexpr,
                       BN: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr):
        """dz for columns [v_lo, v_hi), recomputed from the logits. With p = exp(z - lse):
        logprobs: dz = (g (onehot - p) - ge p (z - lse + H)) * inv_t      (c = H, the entropy)
        KL:       dz = g p ((z - r) - E_p[z - r]) * inv_t                  (c = E_p[z - r])
        The one-hot term is added in fp32 before any rounding of dz."""
        pid_n = tl.program_id(0)
        pid_v = tl.program_id(1)
        rows = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
        rmask = rows < N
        cols = v_lo + pid_v.to(tl.int64) * BV + tl.arange(0, BV)
        cmask = cols < v_hi
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, D, stride_h, stride_w, inv_t,
                         HAS_BIAS, UPCAST, IEEE, BN, BV, BK)
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        c = tl.load(c_ptr + rows, mask=rmask, other=0.0)
        g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
        lsm = z - lse[:, None]
        p = tl.exp(lsm)
        if KL:
            r = _logits_tile(rh_ptr, rw_ptr, rb_ptr, rows, cols, rmask, cmask, RD, stride_rh, stride_rw, inv_t,
                             HAS_RBIAS, UPCAST, IEEE, BN, BV, BK)
            dz = g[:, None] * p * ((z - r) - c[:, None])
        else:
            tgt = tl.load(t_ptr + rows, mask=rmask, other=-1)
            dz = -g[:, None] * p
            if ENTROPY:
                ge = tl.load(ge_ptr + rows, mask=rmask, other=0.0)
                dz -= tl.where(p > 0, ge[:, None] * p * (lsm + c[:, None]), 0.0)
            dz += tl.where(cols[None, :] == tgt[:, None], g[:, None], 0.0)
        dz = dz * inv_t
        ptrs = dz_ptr + rows[:, None] * stride_dz + (cols - v_lo)[None, :]
        tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])

    # GPU tiles and launch per kind, shared by the launchers and the AOT check. bf16/fp16 run on
    # tensor cores (wgmma on sm_90); fp32 uses exact (ieee) fp32 dots, FMA loops on CUDA cores.
    # Chosen so that no variant spills registers on sm_80 or sm_90 (compile_check --max-spill 0):
    # - lp16 (sm_90+): timed on an H100 against five other tilings (benchmarks/gpu/bench_linear_logprobs.py
    #   --sweep); 238-254 registers, no spill.
    # - lp16@sm80: the same tile spills 264 bytes with Ampere's mma fragments; 128x64 does not. Not timed.
    # - kl16: two logit tiles per step. At 128x128 it spilled 220 bytes (sm_90) / 756 (sm_80); 128x64 does not.
    # - lp32 / kl32: at 128x128 the FMA tiles spilled up to 44 KB per thread; these do not. Not timed.
    GPU_CONFIGS = {
        "lp16": {"BN": 128, "BV": 128, "BK": 64, "num_warps": 8, "num_stages": 3},
        "lp16@sm80": {"BN": 128, "BV": 64, "BK": 64, "num_warps": 8, "num_stages": 3},
        "kl16": {"BN": 128, "BV": 64, "BK": 64, "num_warps": 8, "num_stages": 3},
        "lp32": {"BN": 32, "BV": 64, "BK": 16, "num_warps": 4, "num_stages": 2},
        "kl32": {"BN": 32, "BV": 64, "BK": 16, "num_warps": 4, "num_stages": 2},
    }

    def _config_key(kl: bool, fp32: bool, cc: int) -> str:
        key = ("kl" if kl else "lp") + ("32" if fp32 else "16")
        return key + "@sm80" if cc < 90 and key + "@sm80" in GPU_CONFIGS else key

    def _sig(dt: str, kind: str) -> dict:
        sig = {"h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "t_ptr": "*i64",
               "rh_ptr": f"*{dt}", "rw_ptr": f"*{dt}", "rb_ptr": f"*{dt}"}
        if kind == "fwd":
            sig.update({k: "*fp32" for k in ("m_ptr", "s_ptr", "a_ptr", "x_ptr", "rm_ptr", "rs_ptr")})
            sig.update({"N": "i64", "V": "i64", "D": "i32", "RD": "i32", "stride_h": "i64", "stride_w": "i64",
                        "stride_rh": "i64", "stride_rw": "i64", "inv_t": "fp32", "v_per_split": "i64"})
        else:
            sig.update({"lse_ptr": "*fp32", "c_ptr": "*fp32", "g_ptr": "*fp32", "ge_ptr": "*fp32",
                        "dz_ptr": f"*{dt}"})
            sig.update({"N": "i64", "V": "i64", "D": "i32", "RD": "i32", "stride_h": "i64", "stride_w": "i64",
                        "stride_rh": "i64", "stride_rw": "i64", "inv_t": "fp32", "v_lo": "i64", "v_hi": "i64",
                        "stride_dz": "i64"})
        for k in ("HAS_BIAS", "HAS_RBIAS", "ENTROPY", "KL", "UPCAST", "IEEE", "BN", "BV", "BK"):
            sig[k] = "constexpr"
        return sig

    for _dt in ("bf16", "fp16", "fp32"):
        for _kl, _ent, _bias in ((False, True, False), (False, False, True), (True, False, False)):
            # one spec per distinct launch configuration: sm_80 (Ampere) and sm_90+ may differ
            _k80, _k90 = _config_key(_kl, _dt == "fp32", 80), _config_key(_kl, _dt == "fp32", 90)
            _variants = [(_k90, None, "")] if _k80 == _k90 else [(_k80, (80, 90), ",sm80"), (_k90, (90, 999), ",sm90")]
            for _key, _archs, _suffix in _variants:
                _cfg = dict(GPU_CONFIGS[_key])
                _launch = {"num_warps": _cfg.pop("num_warps"), "num_stages": _cfg.pop("num_stages")}
                _ce = dict(_cfg, HAS_BIAS=_bias, HAS_RBIAS=False, ENTROPY=_ent, KL=_kl, UPCAST=False,
                           IEEE=_dt == "fp32")
                _tag = f"{_dt},{'kl' if _kl else 'lp'}{',ent' if _ent else ''}{',bias' if _bias else ''}{_suffix}"
                # Hidden sizes are multiples of 16 (576, 2048, 4096): the JIT then vectorises the K loads.
                for _nm, _kern, _kind in (("fwd", _fwd_kernel, "fwd"), ("bwd_dz", _bwd_dz_kernel, "bwd")):
                    _aot.register(f"linear_logprobs_{_nm}[{_tag}]", _kern, _sig(_dt, _kind), _ce, **_launch,
                                  has_dot=_dt != "fp32", extra_divisible=("D", "RD"), archs=_archs)


@functools.cache
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def _config(h: torch.Tensor, n: int, v: int, kl: bool) -> dict:
    """Tiles (BN, BV, BK), launch options and dtype flags for one kernel launch."""
    flags = {"UPCAST": INTERPRET and h.dtype != torch.float32, "IEEE": h.dtype == torch.float32}
    if INTERPRET or not h.is_cuda:  # the interpreter pays per op, not per element: few big tiles are fastest
        return {"BN": 32 if n > 16 else 16, "BV": 128 if v > 64 else 64, "BK": 32, "num_warps": 4,
                "num_stages": 1, **flags}
    idx = h.device.index if h.device.index is not None else torch.cuda.current_device()
    return {**GPU_CONFIGS[_config_key(kl, h.dtype == torch.float32, _capability(idx))], **flags}


def triton_forward_stats(h, w, b, t, inv_t, *, entropy, rh=None, rw=None, rb=None):
    """Runs the forward kernel over token blocks x vocab splits and merges the splits.
    Returns (lse, lp, ent) for logprobs (lp = target logprob, ent = entropy or None), or
    (lse, ref_lse, kl) for KL. All fp32 [N]."""
    n, d = h.shape
    V = w.shape[0]
    kl = rh is not None
    blk = _config(h, n, V, kl)
    n_blocks = triton.cdiv(n, blk["BN"])
    # Enough programs to fill the GPU: split the vocab when there are few token blocks.
    sms = torch.cuda.get_device_properties(h.device).multi_processor_count if h.is_cuda else 4
    n_split = max(1, min(triton.cdiv(2 * sms, n_blocks), triton.cdiv(V, blk["BV"])))
    v_per = triton.cdiv(triton.cdiv(V, n_split), blk["BV"]) * blk["BV"]
    n_split = triton.cdiv(V, v_per)
    f32 = {"dtype": torch.float32, "device": h.device}
    m, s, a, x, rm, rs = (torch.empty(n_split, n, **f32) for _ in range(6))
    dummy = h
    _fwd_kernel[(n_blocks, n_split)](
        h, w, b if b is not None else dummy, t if t is not None else m,
        rh if kl else dummy, rw if kl else dummy, rb if (kl and rb is not None) else dummy,
        m, s, a, x, rm, rs,
        n, V, d, rh.shape[1] if kl else d, h.stride(0), w.stride(0),
        rh.stride(0) if kl else 0, rw.stride(0) if kl else 0, inv_t, v_per,
        HAS_BIAS=b is not None, HAS_RBIAS=kl and rb is not None, ENTROPY=entropy and not kl, KL=kl, **blk)
    # Merge the vocab splits (exact log-sum-exp algebra).
    M = m.amax(0)
    scale = torch.exp(m - M)
    S = (s * scale).sum(0)
    lse = M + torch.log(S)
    if kl:
        RM = rm.amax(0)
        ref_lse = RM + torch.log((rs * torch.exp(rm - RM)).sum(0))
        ed = (a * scale).sum(0) / S  # E_p[z - r]
        return lse, ref_lse, ed
    lp = (x.sum(0) - M) - torch.log(S)  # not x - lse: lse rounds at the scale of |M|
    ent = None
    if entropy:
        A = (scale * (a + (m - M) * s)).sum(0)
        ent = torch.log(S) - A / S
    return lse, lp, ent


_ADDMM_OUT_DTYPE = [True]


def _addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b for an fp32 acc, accumulated in fp32 inside the GEMM where torch allows it.
    On CUDA, addmm with out_dtype accumulates into acc (beta = 1) with no [N, d] fp32 temporary,
    which at N=16384, d=4096 is 268 MB and one more pass over it per vocab slice."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _ADDMM_OUT_DTYPE[0]:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError):
            # Older torch has no out_dtype, and some versions require self's dtype to equal the
            # inputs'. Both checks run before anything is written; do not try again.
            _ADDMM_OUT_DTYPE[0] = False
        try:
            acc += torch.mm(a, b, out_dtype=torch.float32)
            return
        except (TypeError, RuntimeError):
            pass
    acc += (a @ b).float()


def triton_backward(h, w, b, t, lse, c, g, ge, inv_t, need_h, need_w, need_b, *, rh=None, rw=None, rb=None):
    """dz slices over the vocab from _bwd_dz_kernel; GEMMs for dhidden (fp32 accumulation across
    slices) and dweight (complete per slice). Returns (dh fp32 or None, dw in w.dtype or None,
    db fp32 or None)."""
    n, d = h.shape
    V = w.shape[0]
    kl = rh is not None
    blk = _config(h, n, V, kl)
    elt = h.element_size()
    vs = max(blk["BV"], (GPU_DZ_BYTES // max(1, n * elt)) // blk["BV"] * blk["BV"])
    vs = min(vs, V)
    dz_buf = torch.empty(n * vs, dtype=h.dtype, device=h.device)
    dh = torch.zeros(n, d, dtype=torch.float32, device=h.device) if need_h else None
    dw = torch.empty_like(w) if need_w else None
    db = torch.empty(V, dtype=torch.float32, device=h.device) if need_b else None
    dummy = h
    for v_lo in range(0, V, vs):
        v_hi = min(V, v_lo + vs)
        width = v_hi - v_lo
        grid = (triton.cdiv(n, blk["BN"]), triton.cdiv(width, blk["BV"]))
        dz = dz_buf[: n * width].view(n, width)  # contiguous, so the GEMMs never see padding
        _bwd_dz_kernel[grid](
            h, w, b if b is not None else dummy, t if t is not None else lse,
            rh if kl else dummy, rw if kl else dummy, rb if (kl and rb is not None) else dummy,
            lse, c, g, ge if ge is not None else g, dz,
            n, V, d, rh.shape[1] if kl else d, h.stride(0), w.stride(0),
            rh.stride(0) if kl else 0, rw.stride(0) if kl else 0, inv_t, v_lo, v_hi, dz.stride(0),
            HAS_BIAS=b is not None, HAS_RBIAS=kl and rb is not None, ENTROPY=ge is not None and not kl, KL=kl,
            **blk)
        dzs = dz
        if need_w:
            torch.mm(dzs.t(), h, out=dw[v_lo:v_hi])
        if need_h:
            _addmm_f32_(dh, dzs, w[v_lo:v_hi])
        if need_b:
            db[v_lo:v_hi] = dzs.sum(0, dtype=torch.float32)
    return dh, dw, db


# ----------------------------------------------------------------------------- chunked torch path
def _ct(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows(V: int, n: int, nbytes: int) -> int:
    """Rows of a [rows, V] fp32 buffer that fit nbytes."""
    return max(1, min(n, nbytes // max(1, V * 4)))


def _logits_into(out, h_c, wc, bc, inv_t):
    torch.matmul(h_c, wc.t(), out=out)
    if bc is not None:
        out.add_(bc)
    if inv_t != 1.0:
        out.mul_(inv_t)
    return out


def torch_forward(h, w, b, t, inv_t, entropy, cache_rows):
    """Chunked forward over token rows. h [n, d], t [n] valid targets. Returns (lp, ent or None,
    lse, cache) where cache [k, V] holds log_softmax of the first k <= cache_rows rows.

    ATen's log_softmax works row by row with the row hot in L2, so it beats separate max / exp /
    sum sweeps over a whole chunk by about 2x; the temperature is folded into the small hidden chunk."""
    ct = _ct(h.dtype)
    n, V = h.shape[0], w.shape[0]
    wc = w.to(ct)
    bc = b.to(ct) * inv_t if b is not None else None
    # Bigger chunks make better GEMMs. When a backward follows, it will hold dweight ([V, d] fp32)
    # next to the cache, so the forward may use that much more scratch without raising the peak.
    C = chunk_rows(V, n, (WORK_BYTES + (V * w.shape[1] * 4 if cache_rows else 0)) // 2)
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
    ct = _ct(h.dtype)
    n, d = h.shape
    V = w.shape[0]
    wc = w.to(ct)
    hc = h.to(ct)
    k = cache.shape[0]
    kw = {"dtype": ct, "device": h.device}
    nbuf = 2 if ge is not None else 1
    vs = max(1, min(V, WORK_BYTES // max(1, nbuf * n * 4)))
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
            lsm.clamp_(min=_LOWEST).mul_(p)  # p * lsm; -inf logits (p = 0) contribute 0
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
        slice_grads(dz, hc, wc, v0, v1, dh, dw, db)
    return dh, dw, db


def slice_grads(dz, hc, wc, v0, v1, dh, dw, db):
    """The chunked backward's GEMMs for vocab slice [v0, v1): dweight[slice] = dz.T @ hidden, written
    once; dhidden += dz @ weight[slice]; dbias[slice] = dz summed over tokens (None: not wanted).
    Shared with linear_kl."""
    if dw is not None:
        torch.matmul(dz.t(), hc, out=dw[v0:v1])
    if dh is not None:
        dh.addmm_(dz, wc[v0:v1])
    if db is not None:
        db[v0:v1] = dz.sum(0)


# ----------------------------------------------------------------------------- op bodies
def _out_dtype(h: torch.Tensor) -> torch.dtype:
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def _valid_index(t: torch.Tensor, ignore_index: int):
    valid = t != ignore_index
    if bool(valid.all()):
        return None
    return valid.nonzero().squeeze(1)


def _cache_rows(n: int, V: int, save: bool) -> int:
    return CACHE_BYTES // (V * 4) if save else 0


def _fwd_impl(h, w, b, t, temperature, ignore_index, entropy, backend, save):
    """Returns (lp [n], ent [n], lse [n], cache [k, V]); rows of ignored targets are zero."""
    n, V = h.shape[0], w.shape[0]
    inv_t = 1.0 / temperature
    idx = _valid_index(t, ignore_index)
    hs, ts = (h, t) if idx is None else (h.index_select(0, idx), t.index_select(0, idx))
    f32 = {"dtype": _out_dtype(h), "device": h.device}
    cache = torch.empty(0, V, **f32)
    if hs.shape[0] == 0:
        z = torch.zeros(n, **f32)
        return z, z.clone(), z.clone(), cache
    if backend == "triton":
        lse, lp, ent = triton_forward_stats(hs.contiguous(), w.contiguous(), b, ts.contiguous(), inv_t,
                                            entropy=entropy)
    else:
        lp, ent, lse, cache = torch_forward(hs, w, b, ts, inv_t, entropy, _cache_rows(n, V, save))
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
        dh, dw, db = triton_backward(h.contiguous(), w.contiguous(), b, t.contiguous(), lse.contiguous(),
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
    f = hidden.new_empty(n, dtype=_out_dtype(hidden))
    ctx = torch.library.get_ctx()
    k = ctx.new_dynamic_size()  # how many rows fit the cache depends on the valid-token count
    return f, f.clone(), f.clone(), hidden.new_empty(k, V, dtype=_out_dtype(hidden))


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


def grad_placeholders(hidden, weight, bias, need_h, need_w, need_b):
    """Fake (meta) gradients of (hidden, weight, bias); empty where not needed. Shared with linear_kl."""
    return (torch.empty_like(hidden) if need_h else hidden.new_empty(0),
            torch.empty_like(weight) if need_w else weight.new_empty(0),
            torch.empty_like(bias) if need_b else weight.new_empty(0))


@_lp_bwd_op.register_fake
def _(g, ge, hidden, weight, bias, targets, lse, ent, cache, temperature, ignore_index, entropy, backend,
      need_h, need_w, need_b):
    return grad_placeholders(hidden, weight, bias, need_h, need_w, need_b)


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
def check_linear_inputs(op, hidden, weight, bias, hname="hidden", wname="weight", bname="bias"):
    _checks.tensor(hname, hidden, floating=True)
    _checks.tensor(wname, weight, floating=True, ndim=2)
    if hidden.dim() < 1:
        raise ValueError(f"{hname} must have at least 1 dim [..., d], got shape {tuple(hidden.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{wname} has shape {tuple(weight.shape)} but {hname}'s last dim is {hidden.shape[-1]}")
    if weight.shape[0] == 0:
        raise ValueError(f"{wname} must have at least one vocabulary row")
    _checks.same_device(wname, weight, hname, hidden)
    if bias is not None:
        _checks.tensor(bname, bias, floating=True, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{bname} has shape {tuple(bias.shape)} but {wname} has {weight.shape[0]} rows")
        _checks.same_device(bname, bias, hname, hidden)


def check_temperature(temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def common_dtype(*xs):
    dt = xs[0].dtype
    for x in xs[1:]:
        if x is not None:
            dt = torch.promote_types(dt, x.dtype)
    return dt


def _needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


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
    check_linear_inputs("linear_logprobs", hidden, weight, bias)
    _checks.tensor("targets", targets, integer=True)
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets has shape {tuple(targets.shape)} but hidden has leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    _checks.same_device("targets", targets, "hidden", hidden)
    temperature = check_temperature(temperature)
    V = weight.shape[0]
    t = targets.reshape(-1).long()
    if t.numel() and not torch.compiler.is_compiling():
        bad = (t != ignore_index) & ((t < 0) | (t >= V))
        if bool(bad.any()):
            raise ValueError(f"targets must be in [0, {V}) or equal ignore_index={ignore_index}; "
                             f"got {int(t[bad][0])}")
    b = pick_backend(backend, hidden.device, supported=_SUPPORTED, op="linear_logprobs")
    if hidden.dtype == torch.float64 or weight.dtype == torch.float64:
        if backend == "triton":
            raise ValueError("linear_logprobs: backend 'triton' does not take float64 inputs")
        b = "torch"
    ct = common_dtype(hidden, weight, bias)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    h2, w2 = h2.to(ct), weight.to(ct)
    b2 = bias.to(ct) if bias is not None else None
    save = _needs_grad(hidden, weight, bias)
    lp, ent, _, _ = _lp_op(h2, w2, b2, t, temperature, int(ignore_index), bool(return_entropy), b, save)
    lp = lp.reshape(targets.shape)
    if return_entropy:
        return lp, ent.reshape(targets.shape)
    return lp
