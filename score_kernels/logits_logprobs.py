"""logprobs_from_logits: linear_logprobs' semantics for a trainer that already holds logits.

    logprobs = log_softmax(logits / temperature)[target],  entropy = -sum_v p_v log p_v

"triton": one pass over each row's logits with an online log-sum-exp (running max starts at
-inf), fp32 statistics, never a full-size temporary; the backward kernel writes dlogits directly.
"torch": row chunks upcast to fp32 one at a time (so bf16 logits never become one fp32 copy),
analytic backward. Targets equal to ignore_index give 0 and exactly zero gradient.
"""
from __future__ import annotations

import torch

from score_kernels import _aot, _checks
from score_kernels import _vocab_tiles as vt
from score_kernels._backend import pick_backend
from score_kernels._triton_utils import HAVE_TRITON, tl, triton

_SUPPORTED = ("triton", "torch")
_BLOCK = 2048


def logprobs_from_logits_reference(logits, targets, *, temperature=1.0, ignore_index=-100, return_entropy=False):
    ct = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lsm = torch.log_softmax(logits.to(ct) / temperature, -1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    lp = torch.where(valid, lsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1), torch.zeros((), dtype=ct))
    if not return_entropy:
        return lp
    plogp = torch.where(lsm > float("-inf"), lsm.exp() * lsm, torch.zeros((), dtype=ct))
    ent = torch.where(valid, -plogp.sum(-1), torch.zeros((), dtype=ct))
    return lp, ent


if HAVE_TRITON:

    @triton.jit
    def _row_fwd_kernel(x_ptr, t_ptr, lp_ptr, ent_ptr, lse_ptr, V, stride_x, inv_t, ignore_index,
                        ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        tgt = tl.load(t_ptr + row)
        base = x_ptr + row * stride_x
        m = tl.full((BLOCK,), float("-inf"), tl.float32)  # per-lane running max, merged at the end
        s = tl.zeros((BLOCK,), tl.float32)
        a = tl.zeros((BLOCK,), tl.float32)  # per lane: sum exp(z - m) (z - m)
        for v0 in range(0, V, BLOCK):
            cols = v0 + tl.arange(0, BLOCK)
            z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_t
            m_new = tl.maximum(m, z)
            finite = m_new > float("-inf")
            alpha = tl.where(finite, tl.exp(m - m_new), 0.0)
            e = tl.where(finite, tl.exp(z - m_new), 0.0)
            if ENTROPY:
                shift = tl.where(s > 0, (m - m_new) * s, 0.0)
                a = alpha * (a + shift) + tl.where(finite & (e > 0), e * (z - m_new), 0.0)
            s = s * alpha + e
            m = m_new
        M = tl.max(m, 0)
        scale = tl.where(m > float("-inf"), tl.exp(m - M), 0.0)
        S = tl.sum(s * scale, 0)
        lse = M + tl.log(S)
        valid = tgt != ignore_index
        zt = tl.load(base + tl.where(valid, tgt, 0)).to(tl.float32) * inv_t
        # (zt - M) - log S, not zt - lse: lse rounds at the scale of |M|
        tl.store(lp_ptr + row, tl.where(valid, (zt - M) - tl.log(S), 0.0))
        tl.store(lse_ptr + row, lse)
        if ENTROPY:
            A = tl.sum(scale * (a + tl.where(s > 0, (m - M) * s, 0.0)), 0)
            tl.store(ent_ptr + row, tl.where(valid, tl.log(S) - A / S, 0.0))

    @triton.jit
    def _row_bwd_kernel(x_ptr, t_ptr, g_ptr, ge_ptr, lse_ptr, ent_ptr, dx_ptr, V, stride_x, stride_dx, inv_t,
                        ignore_index, ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        tgt = tl.load(t_ptr + row)
        valid = tgt != ignore_index
        g = tl.where(valid, tl.load(g_ptr + row), 0.0)
        lse = tl.load(lse_ptr + row)
        if ENTROPY:
            ge = tl.where(valid, tl.load(ge_ptr + row), 0.0)
            h = tl.load(ent_ptr + row)
        for v0 in range(0, V, BLOCK):
            cols = v0 + tl.arange(0, BLOCK)
            cm = cols < V
            lsm = tl.load(x_ptr + row * stride_x + cols, mask=cm, other=0.0).to(tl.float32) * inv_t - lse
            p = tl.exp(lsm)
            dz = -g * p
            if ENTROPY:
                dz -= tl.where(p > 0, ge * p * (lsm + h), 0.0)
            dz += tl.where(cols == tgt, g, 0.0)
            dz = tl.where(valid, dz * inv_t, 0.0)
            tl.store(dx_ptr + row * stride_dx + cols, dz.to(dx_ptr.dtype.element_ty), mask=cm)

    for _dt in ("fp32", "bf16", "fp16"):
        for _e in (False, True):
            _aot.register(f"logprobs_from_logits_fwd[{_dt}{',ent' if _e else ''}]", _row_fwd_kernel,
                          {"x_ptr": f"*{_dt}", "t_ptr": "*i64", "lp_ptr": "*fp32", "ent_ptr": "*fp32",
                           "lse_ptr": "*fp32", "V": "i64", "stride_x": "i64", "inv_t": "fp32", "ignore_index": "i64",
                           "ENTROPY": "constexpr", "BLOCK": "constexpr"}, {"ENTROPY": _e, "BLOCK": _BLOCK},
                          num_warps=8)
            _aot.register(f"logprobs_from_logits_bwd[{_dt}{',ent' if _e else ''}]", _row_bwd_kernel,
                          {"x_ptr": f"*{_dt}", "t_ptr": "*i64", "g_ptr": "*fp32", "ge_ptr": "*fp32",
                           "lse_ptr": "*fp32", "ent_ptr": "*fp32", "dx_ptr": f"*{_dt}", "V": "i64",
                           "stride_x": "i64", "stride_dx": "i64", "inv_t": "fp32", "ignore_index": "i64",
                           "ENTROPY": "constexpr", "BLOCK": "constexpr"}, {"ENTROPY": _e, "BLOCK": _BLOCK},
                          num_warps=8)


def _block(V: int) -> int:
    return min(_BLOCK, max(16, triton.next_power_of_2(V)))


def _torch_fwd(x, t, inv_t, ignore_index, entropy):
    ct = vt.compute_dtype(x.dtype)
    n, V = x.shape
    C = vt.chunk_rows(V, n, vt.WORK_BYTES // 2)
    kw = {"dtype": ct, "device": x.device}
    lp, lse = torch.empty(n, **kw), torch.empty(n, **kw)
    ent = torch.zeros(n, **kw)
    zb, eb = torch.empty(C, V, **kw), torch.empty(C, V, **kw)
    valid = t != ignore_index
    safe = torch.where(valid, t, torch.zeros_like(t))
    for r0 in range(0, n, C):
        r1 = min(n, r0 + C)
        z = zb[: r1 - r0]
        z.copy_(x[r0:r1])
        if inv_t != 1.0:
            z.mul_(inv_t)
        mx = z.amax(1, keepdim=True)
        zt = z.gather(1, safe[r0:r1, None])
        z.sub_(mx)
        e = torch.exp(z, out=eb[: r1 - r0])
        s = e.sum(1, keepdim=True)
        logs = s.log()
        lse[r0:r1] = (mx + logs).squeeze(1)
        lp[r0:r1] = (zt - mx - logs).squeeze(1)
        if entropy:  # -inf logits have p = 0: clamp so that 0 * z stays 0
            ent[r0:r1] = (logs - e.mul_(z.clamp_(min=vt.LOWEST)).sum(1, keepdim=True) / s).squeeze(1)
    zero = torch.zeros((), **kw)
    return torch.where(valid, lp, zero), torch.where(valid, ent, zero), lse


def _torch_bwd(x, t, g, ge, lse, ent, inv_t, ignore_index):
    ct = vt.compute_dtype(x.dtype)
    n, V = x.shape
    C = vt.chunk_rows(V, n, vt.WORK_BYTES // 2)
    dx = torch.empty_like(x)
    kw = {"dtype": ct, "device": x.device}
    zb, eb = torch.empty(C, V, **kw), torch.empty(C, V, **kw)
    valid = t != ignore_index
    g = torch.where(valid, g.to(ct), 0.0)[:, None]
    ge = torch.where(valid, ge.to(ct), 0.0)[:, None] if ge is not None else None
    safe = torch.where(valid, t, torch.zeros_like(t))
    for r0 in range(0, n, C):
        r1 = min(n, r0 + C)
        lsm = zb[: r1 - r0]
        lsm.copy_(x[r0:r1])
        lsm.mul_(inv_t).sub_(lse[r0:r1, None])
        p = torch.exp(lsm, out=eb[: r1 - r0])
        gc = g[r0:r1]
        if ge is not None:
            gec = ge[r0:r1]
            lsm.clamp_(min=vt.LOWEST).add_(ent[r0:r1, None]).mul_(gec).add_(gc)  # g + ge (lsm + H)
            dz = p.mul_(lsm).mul_(-inv_t)
        else:
            dz = p.mul_(gc * -inv_t)
        dz.scatter_add_(1, safe[r0:r1, None], gc * inv_t)
        dx[r0:r1] = dz
    return dx


@torch.library.custom_op("score::logprobs_from_logits", mutates_args=())
def _op(logits: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int, entropy: bool,
        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, V = logits.shape
    inv_t = 1.0 / temperature
    if backend == "triton":
        x = logits if logits.stride(1) == 1 else logits.contiguous()
        f32 = {"dtype": torch.float32, "device": x.device}
        lp, ent, lse = torch.empty(n, **f32), torch.zeros(n, **f32), torch.empty(n, **f32)
        if n:
            _row_fwd_kernel[(n,)](x, targets, lp, ent, lse, V, x.stride(0), inv_t, ignore_index,
                                  ENTROPY=entropy, BLOCK=_block(V), num_warps=8 if x.is_cuda else 4)
        return lp, ent, lse
    return _torch_fwd(logits, targets, inv_t, ignore_index, entropy)


@_op.register_fake
def _(logits, targets, temperature, ignore_index, entropy, backend):
    f = logits.new_empty(logits.shape[0], dtype=vt.out_dtype(logits))
    return f, f.clone(), f.clone()


@torch.library.custom_op("score::logprobs_from_logits_backward", mutates_args=())
def _bwd_op(g: torch.Tensor, ge: torch.Tensor | None, logits: torch.Tensor, targets: torch.Tensor,
            lse: torch.Tensor, ent: torch.Tensor, temperature: float, ignore_index: int, backend: str
            ) -> torch.Tensor:
    inv_t = 1.0 / temperature
    if backend == "triton":
        n, V = logits.shape
        x = logits if logits.stride(1) == 1 else logits.contiguous()
        dx = torch.empty_like(x)
        if n:
            gf = g.float().contiguous()
            _row_bwd_kernel[(n,)](x, targets, gf, ge.float().contiguous() if ge is not None else gf, lse, ent, dx,
                                  V, x.stride(0), dx.stride(0), inv_t, ignore_index, ENTROPY=ge is not None,
                                  BLOCK=_block(V), num_warps=8 if x.is_cuda else 4)
        return dx
    return _torch_bwd(logits, targets, g, ge, lse, ent, inv_t, ignore_index)


@_bwd_op.register_fake
def _(g, ge, logits, targets, lse, ent, temperature, ignore_index, backend):
    return torch.empty_like(logits)


def _setup(ctx, inputs, output):
    logits, targets, temperature, ignore_index, entropy, backend = inputs
    _, ent, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, targets, lse, ent)
    ctx.args = (temperature, ignore_index, entropy, backend)


def _backward(ctx, g_lp, g_ent, _g_lse):
    logits, targets, lse, ent = ctx.saved_tensors
    temperature, ignore_index, entropy, backend = ctx.args
    if g_lp is None and g_ent is None:
        return None, None, None, None, None, None
    if g_lp is None:
        g_lp = torch.zeros_like(lse)
    ge = g_ent if (entropy and g_ent is not None) else None
    return _bwd_op(g_lp, ge, logits, targets, lse, ent, temperature, ignore_index, backend), None, None, None, \
        None, None


_op.register_autograd(_backward, setup_context=_setup)


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                         ignore_index: int = -100, return_entropy: bool = False, backend: str | None = None):
    """log_softmax(logits / temperature)[targets] as float32 (float64 for float64 logits), in one
    online-log-sum-exp pass per row; (logprobs, entropy) with return_entropy=True.
    logits [..., V] (float32/bfloat16/float16/float64), targets [...] int64."""
    _checks.tensor("logits", logits, floating=True)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V > 0, got {tuple(logits.shape)}")
    temperature = _checks.temperature(temperature)
    V = logits.shape[-1]
    t = _checks.targets(targets, "logits", logits, V, ignore_index)
    b = pick_backend(backend, logits.device, supported=_SUPPORTED, op="logprobs_from_logits")
    if logits.dtype == torch.float64:
        if backend == "triton":
            raise ValueError("logprobs_from_logits: backend 'triton' does not take float64 inputs")
        b = "torch"
    lp, ent, _ = _op(logits.reshape(-1, V), t, temperature, int(ignore_index), bool(return_entropy), b)
    if return_entropy:
        return lp.reshape(targets.shape), ent.reshape(targets.shape)
    return lp.reshape(targets.shape)
