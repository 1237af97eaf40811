"""Vocabulary-tiled machinery shared by linear_logprobs, linear_kl and logits_logprobs.

- Memory budgets of the chunked paths (user tuning knobs, read once at import, see docs/fused-logprobs.md).
- The fused Triton kernels: a forward that tiles tokens x vocab with tl.dot and merges log-sum-exp
  online (per-token statistics only), and a backward that recomputes the logits of one vocab slice
  and writes dz; one pair serves log-probs/entropy and KL through the KL constexpr. Their launch
  configurations per dtype and arch, and the AOT registrations for compile_check.
- The torch-side pieces of the chunked paths: chunk sizing, logits into a reused buffer, the per
  vocab slice gradient GEMMs, fp32 accumulation of bf16 GEMMs, and fake gradients for torch.library.
"""
from __future__ import annotations

import functools
import os

import torch

from score_kernels import _aot
from score_kernels._backend import INTERPRET
from score_kernels._triton_utils import HAVE_TRITON, tl, triton

LOWEST = -3.0e38  # stands in for -inf logits where 0 * -inf would make NaN

# Budgets, in bytes. WORK: fp32 scratch of the torch paths ([rows, V] chunks forward, [tokens, vocab
# slice] backward). CACHE: logits (or KL factors) kept from forward to backward by the torch paths so
# their GEMM is not recomputed; 0 disables. GPU_DZ: the Triton backward's dz slice [tokens, vocab
# slice] in the input dtype. GPU_CHUNK: the fp32 logits chunk [tokens, vocab chunk] of linear_logprobs'
# impl="gemm" path (its bf16 dz chunk takes half as much again). GPU_CACHE: logits chunks that path
# keeps in bf16/fp16 from forward to backward, each saving one recompute GEMM; 0 (the default) keeps
# none. Tests override them with monkeypatch on this module.
WORK_BYTES = int(float(os.environ.get("SCORE_LOGPROBS_WORK_MB", "32")) * 2**20)
CACHE_BYTES = int(float(os.environ.get("SCORE_LOGPROBS_CACHE_MB", "368")) * 2**20)
GPU_DZ_BYTES = int(float(os.environ.get("SCORE_LOGPROBS_GPU_DZ_MB", "256")) * 2**20)
GPU_CHUNK_BYTES = int(float(os.environ.get("SCORE_LOGPROBS_GPU_CHUNK_MB", "64")) * 2**20)
GPU_CACHE_BYTES = int(float(os.environ.get("SCORE_LOGPROBS_GPU_CACHE_MB", "0")) * 2**20)


# ----------------------------------------------------------------------------- dtypes and budgets
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the torch paths: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def out_dtype(h: torch.Tensor) -> torch.dtype:
    """Dtype of the per-token outputs (log-probs, entropy, KL, lse)."""
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def chunk_rows(V: int, n: int, nbytes: int) -> int:
    """Rows of a [rows, V] fp32 buffer that fit nbytes."""
    return max(1, min(n, nbytes // max(1, V * 4)))


def cache_rows(n: int, V: int, save: bool) -> int:
    """Rows of [rows, V] fp32 kept from forward to backward: none when no gradient follows."""
    return CACHE_BYTES // (V * 4) if save else 0


def common_dtype(*xs):
    dt = xs[0].dtype
    for x in xs[1:]:
        if x is not None:
            dt = torch.promote_types(dt, x.dtype)
    return dt


def needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


def grad_placeholders(hidden, weight, bias, need_h, need_w, need_b):
    """Fake (meta) gradients of (hidden, weight, bias); empty where not needed."""
    return (torch.empty_like(hidden) if need_h else hidden.new_empty(0),
            torch.empty_like(weight) if need_w else weight.new_empty(0),
            torch.empty_like(bias) if need_b else weight.new_empty(0))


# ----------------------------------------------------------------------------- torch chunk pieces
def logits_into(out, h_c, wc, bc, inv_t):
    torch.matmul(h_c, wc.t(), out=out)
    if bc is not None:
        out.add_(bc)
    if inv_t != 1.0:
        out.mul_(inv_t)
    return out


def slice_grads(dz, hc, wc, v0, v1, dh, dw, db):
    """The chunked backward's GEMMs for vocab slice [v0, v1): dweight[slice] = dz.T @ hidden, written
    once; dhidden += dz @ weight[slice]; dbias[slice] = dz summed over tokens (None: not wanted)."""
    if dw is not None:
        torch.matmul(dz.t(), hc, out=dw[v0:v1])
    if dh is not None:
        dh.addmm_(dz, wc[v0:v1])
    if db is not None:
        db[v0:v1] = dz.sum(0)


# ----------------------------------------------------------------------------- fused Triton kernels
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
    def fwd_kernel(h_ptr, w_ptr, b_ptr, t_ptr, rh_ptr, rw_ptr, rb_ptr,
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
    def bwd_dz_kernel(h_ptr, w_ptr, b_ptr, t_ptr, rh_ptr, rw_ptr, rb_ptr,
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
    # Chosen so that no variant spills registers on sm_80 or sm_90 (compile_check --max-spill 0;
    # benchmarks/results/aot_compile_check.json). lp16 (sm_90+) is the fastest of the tilings that
    # benchmarks/gpu/bench_linear_logprobs.py --sweep times; the others (not timed) are cut down from
    # 128x128, which spills with Ampere's mma fragments (lp16@sm80), two logit tiles per step (kl16) and
    # FMA loops (lp32 / kl32).
    GPU_CONFIGS = {
        "lp16": {"BN": 128, "BV": 128, "BK": 64, "num_warps": 8, "num_stages": 3},
        "lp16@sm80": {"BN": 128, "BV": 64, "BK": 64, "num_warps": 8, "num_stages": 3},
        "kl16": {"BN": 128, "BV": 64, "BK": 64, "num_warps": 8, "num_stages": 3},
        "lp32": {"BN": 32, "BV": 64, "BK": 16, "num_warps": 4, "num_stages": 2},
        "kl32": {"BN": 32, "BV": 64, "BK": 16, "num_warps": 4, "num_stages": 2},
    }

    def config_key(kl: bool, fp32: bool, cc: int) -> str:
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
            _k80, _k90 = config_key(_kl, _dt == "fp32", 80), config_key(_kl, _dt == "fp32", 90)
            _variants = [(_k90, None, "")] if _k80 == _k90 else [(_k80, (80, 90), ",sm80"), (_k90, (90, 999), ",sm90")]
            for _key, _archs, _suffix in _variants:
                _cfg = dict(GPU_CONFIGS[_key])
                _launch = {"num_warps": _cfg.pop("num_warps"), "num_stages": _cfg.pop("num_stages")}
                _ce = dict(_cfg, HAS_BIAS=_bias, HAS_RBIAS=False, ENTROPY=_ent, KL=_kl, UPCAST=False,
                           IEEE=_dt == "fp32")
                _tag = f"{_dt},{'kl' if _kl else 'lp'}{',ent' if _ent else ''}{',bias' if _bias else ''}{_suffix}"
                # Hidden sizes are multiples of 16 (576, 2048, 4096): the JIT then vectorises the K loads.
                for _nm, _kern, _kind in (("fwd", fwd_kernel, "fwd"), ("bwd_dz", bwd_dz_kernel, "bwd")):
                    _aot.register(f"linear_logprobs_{_nm}[{_tag}]", _kern, _sig(_dt, _kind), _ce, **_launch,
                                  has_dot=_dt != "fp32", extra_divisible=("D", "RD"), archs=_archs)


@functools.cache
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def launch_config(h: torch.Tensor, n: int, v: int, kl: bool) -> dict:
    """Tiles (BN, BV, BK), launch options and dtype flags for one kernel launch."""
    flags = {"UPCAST": INTERPRET and h.dtype != torch.float32, "IEEE": h.dtype == torch.float32}
    if INTERPRET or not h.is_cuda:  # the interpreter pays per op, not per element: few big tiles are fastest
        return {"BN": 32 if n > 16 else 16, "BV": 128 if v > 64 else 64, "BK": 32, "num_warps": 4,
                "num_stages": 1, **flags}
    idx = h.device.index if h.device.index is not None else torch.cuda.current_device()
    return {**GPU_CONFIGS[config_key(kl, h.dtype == torch.float32, _capability(idx))], **flags}


def triton_forward_stats(h, w, b, t, inv_t, *, entropy, rh=None, rw=None, rb=None):
    """Runs the forward kernel over token blocks x vocab splits and merges the splits.
    Returns (lse, lp, ent) for logprobs (lp = target logprob, ent = entropy or None), or
    (lse, ref_lse, kl) for KL. All fp32 [N]."""
    n, d = h.shape
    V = w.shape[0]
    kl = rh is not None
    blk = launch_config(h, n, V, kl)
    n_blocks = triton.cdiv(n, blk["BN"])
    # Enough programs to fill the GPU: split the vocab when there are few token blocks.
    sms = torch.cuda.get_device_properties(h.device).multi_processor_count if h.is_cuda else 4
    n_split = max(1, min(triton.cdiv(2 * sms, n_blocks), triton.cdiv(V, blk["BV"])))
    v_per = triton.cdiv(triton.cdiv(V, n_split), blk["BV"]) * blk["BV"]
    n_split = triton.cdiv(V, v_per)
    f32 = {"dtype": torch.float32, "device": h.device}
    m, s, a, x, rm, rs = (torch.empty(n_split, n, **f32) for _ in range(6))
    dummy = h
    fwd_kernel[(n_blocks, n_split)](
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


def addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
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


_MM_OUT_DTYPE = [True]


def mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = a @ b as fp32 for fp32/bf16/fp16 a, b: on CUDA one cuBLAS GEMM with bf16 operands and an
    fp32 result (out_dtype), so logits are never rounded to bf16 and cost the GEMM's own speed.
    A torch without out_dtype rounds through the input dtype (what a naive bf16 path does); the CPU,
    which has no such kernel, multiplies upcast copies (the interpreter tests)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda and _MM_OUT_DTYPE[0]:
        try:
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        except (TypeError, RuntimeError):  # checked before anything is written; do not try again
            _MM_OUT_DTYPE[0] = False
    if a.is_cuda:
        return out.copy_(torch.mm(a, b))
    return torch.mm(a.float(), b.float(), out=out)


def triton_backward(h, w, b, t, lse, c, g, ge, inv_t, need_h, need_w, need_b, *, rh=None, rw=None, rb=None):
    """dz slices over the vocab from bwd_dz_kernel; GEMMs for dhidden (fp32 accumulation across
    slices) and dweight (complete per slice). Returns (dh fp32 or None, dw in w.dtype or None,
    db fp32 or None)."""
    n, d = h.shape
    V = w.shape[0]
    kl = rh is not None
    blk = launch_config(h, n, V, kl)
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
        bwd_dz_kernel[grid](
            h, w, b if b is not None else dummy, t if t is not None else lse,
            rh if kl else dummy, rw if kl else dummy, rb if (kl and rb is not None) else dummy,
            lse, c, g, ge if ge is not None else g, dz,
            n, V, d, rh.shape[1] if kl else d, h.stride(0), w.stride(0),
            rh.stride(0) if kl else 0, rw.stride(0) if kl else 0, inv_t, v_lo, v_hi, dz.stride(0),
            HAS_BIAS=b is not None, HAS_RBIAS=kl and rb is not None, ENTROPY=ge is not None and not kl, KL=kl,
            **blk)
        if need_w:
            torch.mm(dz.t(), h, out=dw[v_lo:v_hi])
        if need_h:
            addmm_f32_(dh, dz, w[v_lo:v_hi])
        if need_b:
            db[v_lo:v_hi] = dz.sum(0, dtype=torch.float32)
    return dh, dw, db
