"""TRL's selective_log_softmax and entropy_from_logits (trl 1.16, trl.trainer.utils) as oracles for
logprobs_from_logits. On a CPU TRL takes its torch path (its Triton kernel is CUDA/XPU only)."""
import pytest
import torch

from score_kernels import logprobs_from_logits
from tests.conftest import tol
from tests.external._peers import need

tu = need("trl.trainer.utils")

SHAPES = [(3, 7, 50), (2, 1, 1031), (5, 257), (1, 3, 2)]


def _logits(shape, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    t = torch.randint(0, shape[-1], shape[:-1], generator=g)
    return x.to(dtype), t


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax_fp32(shape, temperature):
    x, t = _logits(shape, torch.float32)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    ours = logprobs_from_logits(a, t, temperature=temperature)
    theirs = tu.selective_log_softmax(b, t, temperature=temperature)
    torch.testing.assert_close(ours, theirs, **tol(torch.float32))
    w = torch.randn(shape[:-1], generator=torch.Generator().manual_seed(1))
    (ga,) = torch.autograd.grad((ours * w).sum(), a)
    (gb,) = torch.autograd.grad((theirs * w).sum(), b)
    torch.testing.assert_close(ga, gb, **tol(torch.float32))


@pytest.mark.parametrize("shape", SHAPES)
def test_selective_log_softmax_bf16(shape):
    """TRL's bf16 path is a bf16 log_softmax (bf16 result); ours reads bf16 and accumulates in fp32. Ours
    equals TRL on the same values upcast to fp32 at fp32 tolerance, and TRL's bf16 output within bf16's
    rounding of values of that size."""
    x, t = _logits(shape, torch.bfloat16)
    a = x.clone().requires_grad_()
    ours = logprobs_from_logits(a, t)
    assert ours.dtype == torch.float32
    up = x.float().requires_grad_()
    theirs32 = tu.selective_log_softmax(up, t)
    torch.testing.assert_close(ours, theirs32, **tol(torch.float32))
    theirs16 = tu.selective_log_softmax(x, t)
    assert theirs16.dtype == torch.bfloat16
    # bf16 keeps 8 bits: |logp| up to ~15 here, so a few ulps of the larger operand
    torch.testing.assert_close(ours, theirs16.float(), rtol=2 ** -6, atol=2 ** -3)
    (ga,) = torch.autograd.grad(ours.sum(), a)
    (gb,) = torch.autograd.grad(theirs32.sum(), up)
    assert ga.dtype == torch.bfloat16
    torch.testing.assert_close(ga.float(), gb, **tol(torch.bfloat16))


def test_selective_log_softmax_row_mask():
    """TRL's row_mask (0: skip the row, return 0) is our ignore_index: 0 and exactly zero gradient."""
    x, t = _logits((4, 9, 33), torch.float32)
    mask = torch.rand(4, 9, generator=torch.Generator().manual_seed(5)) < 0.6
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    ours = logprobs_from_logits(a, t.masked_fill(~mask, -100), ignore_index=-100)
    theirs = tu.selective_log_softmax(b, t, row_mask=mask)
    torch.testing.assert_close(ours, theirs, **tol(torch.float32))
    (ga,) = torch.autograd.grad(ours.sum(), a)
    (gb,) = torch.autograd.grad(theirs.sum(), b)
    torch.testing.assert_close(ga, gb, **tol(torch.float32))
    assert torch.all(ga[~mask] == 0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_from_logits(shape, dtype):
    """TRL computes in the input dtype; ours in fp32, so both are compared on the fp32 upcast."""
    x, t = _logits(shape, dtype, scale=2.0)
    a = x.clone().requires_grad_()
    _, ours = logprobs_from_logits(a, t, return_entropy=True)
    up = x.float().requires_grad_()
    theirs = tu.entropy_from_logits(up, chunk_size=3)  # an odd chunk so the last chunk is partial
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    if dtype == torch.bfloat16:
        theirs16 = tu.entropy_from_logits(x)
        torch.testing.assert_close(ours, theirs16.float(), rtol=2 ** -6, atol=2 ** -5)
    w = torch.randn(shape[:-1], generator=torch.Generator().manual_seed(3))
    (ga,) = torch.autograd.grad((ours * w).sum(), a)
    (gb,) = torch.autograd.grad((theirs * w).sum(), up)
    torch.testing.assert_close(ga.float(), gb, **tol(dtype))


def test_selective_log_softmax_and_entropy():
    x, t = _logits((3, 11, 67), torch.float32)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    lp, ent = logprobs_from_logits(a, t, return_entropy=True, temperature=1.3)
    lp_t, ent_t = tu.selective_log_softmax_and_entropy(b, t, temperature=1.3)
    torch.testing.assert_close(lp, lp_t, **tol(torch.float32))
    torch.testing.assert_close(ent, ent_t, rtol=1e-5, atol=1e-5)
    (ga,) = torch.autograd.grad(lp.sum() + 0.5 * ent.sum(), a)
    (gb,) = torch.autograd.grad(lp_t.sum() + 0.5 * ent_t.sum(), b)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)
