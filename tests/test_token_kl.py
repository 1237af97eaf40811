import pytest
import torch

from score_kernels import KL_ESTIMATORS, token_kl, token_kl_reference
from tests.conftest import tol
from tests.helpers import device, live_backends

DEV = device()
BACKENDS = live_backends(DEV)


def _inputs(shape, dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(shape, generator=g, dtype=torch.float64) * 5 * scale)
    ref = lp + torch.randn(shape, generator=g, dtype=torch.float64) * scale
    return lp.to(DEV, dtype), ref.to(DEV, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(1,), (7, 13), (2, 5, 1031)])
def test_forward_and_grad_match_float64(backend, estimator, dtype, shape):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton path takes fp32/bf16/fp16")
    lp, ref = _inputs(shape, dtype)
    lp.requires_grad_(True)
    out = token_kl(lp, ref, estimator, backend=backend)
    assert out.dtype == torch.float32 and out.shape == lp.shape
    # float64 truth on the same (already rounded) inputs
    lp64 = lp.detach().double().requires_grad_(True)
    want = token_kl_reference(lp64, ref.double(), estimator)
    t = tol(torch.float32 if dtype != torch.float64 else torch.float64)
    # the output is fp32: compare at fp32 precision, relative to the values' magnitude
    torch.testing.assert_close(out.double(), want.double(), rtol=max(t["rtol"], 1e-5), atol=1e-6)
    g = torch.randn(shape, dtype=torch.float32, device=DEV)
    (grad,) = torch.autograd.grad(out, lp, g)
    lp64_d = lp.detach().double() - ref.double()
    dk = {"k1": torch.ones_like(lp64_d), "k2": lp64_d, "k3": -torch.expm1(-lp64_d), "abs": torch.sign(lp64_d)}[
        estimator]
    want_g = g.double() * dk
    assert grad.dtype == dtype
    gt = tol(dtype)
    torch.testing.assert_close(grad.double(), want_g, rtol=max(gt["rtol"], 1e-5), atol=max(gt["atol"], 1e-6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_k3_small_delta_no_cancellation(backend):
    lp = torch.full((64,), -2.0, device=DEV)
    ref = lp - 1e-4
    out = token_kl(lp, ref, "k3", backend=backend)
    # exp(-d)+d-1 ~ d^2/2 = 5e-9: a naive fp32 formula returns 0 or garbage here
    torch.testing.assert_close(out, torch.full_like(out, 0.5e-8), rtol=2e-3, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ref_gets_no_grad_and_default_is_k3(backend):
    lp, ref = _inputs((4, 9), torch.float32)
    ref.requires_grad_(True)
    lp.requires_grad_(True)
    out = token_kl(lp, ref, backend=backend)
    torch.testing.assert_close(out, token_kl_reference(lp, ref, "k3"))
    out.sum().backward()
    assert ref.grad is None and lp.grad is not None


def test_mixed_dtypes_promote():
    lp, ref = _inputs((5,), torch.float32)
    out = token_kl(lp.to(torch.bfloat16), ref, "k2")
    torch.testing.assert_close(out, token_kl_reference(lp.to(torch.bfloat16).float(), ref, "k2"))


@pytest.mark.parametrize("bad,match", [
    (lambda lp, ref: token_kl(lp, ref[:-1]), "ref_logprobs"),
    (lambda lp, ref: token_kl(lp.long(), ref), "logprobs"),
    (lambda lp, ref: token_kl(lp, ref.long()), "ref_logprobs"),
    (lambda lp, ref: token_kl(lp, ref, "k9"), "estimator"),
    (lambda lp, ref: token_kl(lp, ref.to("meta")), "ref_logprobs"),
    (lambda lp, ref: token_kl(lp, ref, backend="nope"), "backend"),
    (lambda lp, ref: token_kl(lp, [1.0]), "ref_logprobs"),
])
def test_bad_input_raises_value_error(bad, match):
    lp, ref = _inputs((6,), torch.float32)
    with pytest.raises(ValueError, match=match):
        bad(lp, ref)


def test_torch_compile_fullgraph():
    lp, ref = _inputs((3, 17), torch.float32)
    lp.requires_grad_(True)

    def f(a, b):
        return (token_kl(a, b, "k3") * 2.0).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(lp, ref)
    (g,) = torch.autograd.grad(out, lp)
    torch.testing.assert_close(out, f(lp, ref))
    torch.testing.assert_close(g, 2 * -torch.expm1(-(lp - ref)).detach())


def test_opcheck():
    lp, ref = _inputs((4, 5), torch.float32)
    lp.requires_grad_(True)
    torch.library.opcheck(torch.ops.score.token_kl.default, (lp, ref, 2, "torch"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_bf16_large(backend):
    if backend not in live_backends("cuda"):
        pytest.skip(f"{backend} not live")
    lp, ref = _inputs((3, 1 << 20), torch.bfloat16)
    lp.requires_grad_(True)
    out = token_kl(lp, ref, "k3", backend=backend)
    torch.testing.assert_close(out, token_kl_reference(lp.detach(), ref, "k3"), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert torch.isfinite(lp.grad.float()).all()


@pytest.mark.skipif("cpu" not in live_backends("cpu"), reason="CPU extension not built")
def test_cpu_expm1_within_2_ulp_of_float64():
    # The CPU extension's k3 uses its own vectorisable expm1 (csrc/common/expm1.h). The k3 gradient
    # with an upstream 1 and ref 0 is exactly -expm1(-logprob): check it against float64 everywhere
    # float32 has a finite result, at the reduction's seams and in the special values.
    x = torch.cat([torch.linspace(-88.5, 88.5, 200_001, dtype=torch.float64),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-8, -1e-8, 0.34657, -0.34657, 0.3466, 88.0, -88.0,
                                 88.72, 104.0, -104.0], dtype=torch.float64)]).float()
    lp = -x  # grad = -expm1(-lp) = -expm1(x)
    got = -torch.ops.score_ext.token_kl_bwd(torch.ones_like(lp), lp, torch.zeros_like(lp), 2).double()
    want = torch.expm1(x.double())
    finite = want.abs() < torch.finfo(torch.float32).max
    ulp = torch.ldexp(torch.ones_like(want), torch.frexp(want.float())[1].long() - 24).double()
    err = ((got - want).abs() / ulp)[finite & (want != 0)]
    assert err.max().item() <= 2.0, x[finite & (want != 0)][err.argmax()].item()
    assert (got[want == 0] == 0).all()
    assert torch.isinf(got[~finite]).all() and (got[~finite] > 0).all()
    special = torch.tensor([float("inf"), float("-inf"), float("nan")])
    out = -torch.ops.score_ext.token_kl_bwd(torch.ones(3), -special, torch.zeros(3), 2)
    assert out[0] == float("inf") and out[1] == -1.0 and torch.isnan(out[2])
