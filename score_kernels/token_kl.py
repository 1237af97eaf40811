"""token_kl: per-token KL estimators between a policy's and a reference's sampled-token log-probs.

With delta = logprobs - ref_logprobs:
    k1  = delta                      (unbiased, high variance, can be negative)
    k2  = 0.5 * delta**2
    k3  = exp(-delta) + delta - 1    (unbiased for KL(pi||ref) under samples of pi, always >= 0)
    abs = |delta|
Output is float32 with the input shape. Differentiable with respect to `logprobs` only.

Layers: Triton kernel (GPU / interpreter), compiled CUDA and CPU kernels (csrc/), the PyTorch
reference `token_kl_reference`, a torch.library custom op with autograd, and the AOT registration.
"""
from __future__ import annotations

import torch

from score_kernels import _aot, _checks
from score_kernels._backend import pick_backend
from score_kernels._triton_utils import HAVE_TRITON, expm1, tl, triton

ESTIMATORS = ("k1", "k2", "k3", "abs")  # index = csrc/common/kl_math.h KLEstimator
_SUPPORTED = ("triton", "cuda", "cpu", "torch")
_EXT_OPS = ("token_kl_fwd", "token_kl_bwd")
_BLOCK = 1024


# ----------------------------------------------------------------------------- reference
def token_kl_reference(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Pure PyTorch. Computes in float64 when either input is float64, else float32."""
    ct = torch.float64 if torch.float64 in (logprobs.dtype, ref_logprobs.dtype) else torch.float32
    d = logprobs.to(ct) - ref_logprobs.to(ct)
    if estimator == "k1":
        out = d
    elif estimator == "k2":
        out = 0.5 * d * d
    elif estimator == "k3":
        out = torch.expm1(-d) + d
    elif estimator == "abs":
        out = d.abs()
    else:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    return out.to(torch.float32)


def grad_reference(g: torch.Tensor, lp: torch.Tensor, ref: torch.Tensor, est: int) -> torch.Tensor:
    ct = torch.float64 if lp.dtype == torch.float64 else torch.float32
    d = lp.to(ct) - ref.to(ct)
    if est == 0:
        dk = torch.ones_like(d)
    elif est == 1:
        dk = d
    elif est == 2:
        dk = -torch.expm1(-d)
    else:
        dk = torch.sign(d)
    return (g.to(ct) * dk).to(lp.dtype)




# ----------------------------------------------------------------------------- triton
if HAVE_TRITON:

    @triton.jit
    def _kl_value(d, EST: tl.constexpr):
        if EST == 0:
            out = d
        elif EST == 1:
            out = 0.5 * d * d
        elif EST == 2:
            out = expm1(-d) + d
        else:
            out = tl.abs(d)
        return out

    @triton.jit
    def _kl_grad(d, EST: tl.constexpr):
        if EST == 0:
            out = tl.full(d.shape, 1.0, tl.float32)
        elif EST == 1:
            out = d
        elif EST == 2:
            out = -expm1(-d)
        else:
            out = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        return out

    @triton.jit
    def _token_kl_fwd_kernel(a_ptr, b_ptr, out_ptr, n, EST: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        a = tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, _kl_value(a - b, EST), mask=m)

    @triton.jit
    def _token_kl_bwd_kernel(g_ptr, a_ptr, b_ptr, grad_ptr, n, EST: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32)
        grad = g * _kl_grad(a - b, EST)
        tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=m)

    for _dt in ("fp32", "bf16", "fp16"):
        for _e in range(4):
            _aot.register(f"token_kl_fwd[{_dt},{ESTIMATORS[_e]}]", _token_kl_fwd_kernel,
                          {"a_ptr": f"*{_dt}", "b_ptr": f"*{_dt}", "out_ptr": "*fp32", "n": "i64",
                           "EST": "constexpr", "BLOCK": "constexpr"}, {"EST": _e, "BLOCK": _BLOCK})
            _aot.register(f"token_kl_bwd[{_dt},{ESTIMATORS[_e]}]", _token_kl_bwd_kernel,
                          {"g_ptr": "*fp32", "a_ptr": f"*{_dt}", "b_ptr": f"*{_dt}", "grad_ptr": f"*{_dt}",
                           "n": "i64", "EST": "constexpr", "BLOCK": "constexpr"}, {"EST": _e, "BLOCK": _BLOCK})


def _fwd_impl(lp: torch.Tensor, ref: torch.Tensor, est: int, backend: str) -> torch.Tensor:
    if backend == "triton":
        lp, ref = lp.contiguous(), ref.contiguous()
        out = torch.empty(lp.shape, dtype=torch.float32, device=lp.device)
        n = lp.numel()
        if n:
            _token_kl_fwd_kernel[(triton.cdiv(n, _BLOCK),)](lp, ref, out, n, EST=est, BLOCK=_BLOCK)
        return out
    if backend in ("cuda", "cpu"):
        return torch.ops.score_ext.token_kl_fwd(lp, ref, est)
    return token_kl_reference(lp, ref, ESTIMATORS[est])


def _bwd_impl(g: torch.Tensor, lp: torch.Tensor, ref: torch.Tensor, est: int, backend: str) -> torch.Tensor:
    if backend == "triton":
        g, lp, ref = g.contiguous(), lp.contiguous(), ref.contiguous()
        grad = torch.empty_like(lp)
        n = lp.numel()
        if n:
            _token_kl_bwd_kernel[(triton.cdiv(n, _BLOCK),)](g, lp, ref, grad, n, EST=est, BLOCK=_BLOCK)
        return grad
    if backend in ("cuda", "cpu"):
        return torch.ops.score_ext.token_kl_bwd(g, lp, ref, est)
    return grad_reference(g, lp, ref, est)


# ----------------------------------------------------------------------------- torch.library
@torch.library.custom_op("score::token_kl", mutates_args=())
def _token_kl_op(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: int, backend: str) -> torch.Tensor:
    return _fwd_impl(logprobs, ref_logprobs, estimator, backend)


@_token_kl_op.register_fake
def _(logprobs, ref_logprobs, estimator, backend):
    return torch.empty(logprobs.shape, dtype=torch.float32, device=logprobs.device)


@torch.library.custom_op("score::token_kl_backward", mutates_args=())
def _token_kl_bwd_op(grad: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: int,
                     backend: str) -> torch.Tensor:
    return _bwd_impl(grad, logprobs, ref_logprobs, estimator, backend)


@_token_kl_bwd_op.register_fake
def _(grad, logprobs, ref_logprobs, estimator, backend):
    return torch.empty_like(logprobs)


def _setup_context(ctx, inputs, output):
    logprobs, ref_logprobs, estimator, backend = inputs
    ctx.save_for_backward(logprobs, ref_logprobs)
    ctx.estimator, ctx.backend = estimator, backend


def _backward(ctx, grad):
    logprobs, ref_logprobs = ctx.saved_tensors
    return _token_kl_bwd_op(grad, logprobs, ref_logprobs, ctx.estimator, ctx.backend), None, None, None


_token_kl_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API
def token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3", *,
             backend: str | None = None) -> torch.Tensor:
    """Per-token KL estimate (float32, same shape). Gradient flows to `logprobs` only.

    backend: None picks triton (CUDA) -> cuda ext -> cpu ext -> torch; or force one of those.
    """
    _checks.tensor("logprobs", logprobs, floating=True)
    _checks.tensor("ref_logprobs", ref_logprobs, floating=True)
    _checks.same_shape("ref_logprobs", ref_logprobs, "logprobs", logprobs)
    _checks.same_device("ref_logprobs", ref_logprobs, "logprobs", logprobs)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    b = pick_backend(backend, logprobs.device, supported=_SUPPORTED, ext_ops=_EXT_OPS, op="token_kl")
    ref = ref_logprobs.detach()
    if ref.dtype != logprobs.dtype:  # kernels read both operands in one dtype
        ct = torch.promote_types(logprobs.dtype, ref.dtype)
        ref = ref.to(ct)
        if ct != logprobs.dtype:
            logprobs = logprobs.to(ct)
    return _token_kl_op(logprobs, ref, ESTIMATORS.index(estimator), b)
