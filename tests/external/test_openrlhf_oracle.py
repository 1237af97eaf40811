"""OpenRLHF's compute_approx_kl (openrlhf 0.11) as the oracle for token_kl k1 / k2 / k3.

openrlhf/models/__init__.py imports the actor, which needs flash_attn (a CUDA-only build), so the package
cannot be imported on a CPU machine. The function lives in openrlhf/models/utils.py, which is loaded here
from the installed distribution on its own. That file's top-level `import deepspeed` serves only
set_z3_leaf_modules; where deepspeed is not installed (the `peers` extra leaves it out: a source build), an
empty placeholder module stands in for it. compute_approx_kl itself uses torch only."""
import importlib.util
import sys
import types
from importlib import metadata

import pytest
import torch

from score_kernels import token_kl
from tests.conftest import tol


def _load_openrlhf_utils():
    try:
        dist = metadata.distribution("openrlhf")
    except metadata.PackageNotFoundError:
        pytest.skip("openrlhf is not installed")
    path = dist.locate_file("openrlhf/models/utils.py")
    if not path.exists():
        pytest.skip(f"openrlhf {dist.version} has no openrlhf/models/utils.py")
    placeholder = importlib.util.find_spec("deepspeed") is None
    if placeholder:
        sys.modules["deepspeed"] = types.ModuleType("deepspeed")
    try:
        spec = importlib.util.spec_from_file_location("_openrlhf_models_utils", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if placeholder:
            del sys.modules["deepspeed"]
    return mod


orl = _load_openrlhf_utils()


def _pair(shape, dtype, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref = -torch.rand(shape, generator=g, dtype=torch.float64) * 4
    lp = ref + torch.randn(shape, generator=g, dtype=torch.float64) * scale
    return lp.to(dtype), ref.to(dtype)


def _openrlhf_difference(ours, est):
    """OpenRLHF clamps every estimate to [-10, 10] (and k3's log-ratio to >= -10 before exp, which with the
    final clamp equals min(k3, 10)); ours is unclamped."""
    return ours.clamp(-10.0, 10.0)


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
@pytest.mark.parametrize("shape", [(3, 37), (1, 1), (2, 5, 9)])
@pytest.mark.parametrize("scale", [0.4, 25.0])  # 25: past the clamps
def test_compute_approx_kl_fp32(est, shape, scale):
    lp, ref = _pair(shape, torch.float32, scale)
    a = lp.clone().requires_grad_()
    b = lp.clone().requires_grad_()
    raw = token_kl(a, ref, est)
    theirs = orl.compute_approx_kl(b, ref, kl_estimator=est)
    torch.testing.assert_close(_openrlhf_difference(raw, est), theirs, rtol=1e-5, atol=1e-6)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    (ga,) = torch.autograd.grad((raw * w).sum(), a)
    (gb,) = torch.autograd.grad((theirs * w).sum(), b)
    live = (raw.detach() > -10) & (raw.detach() < 10)  # where OpenRLHF's clamp does not bite
    torch.testing.assert_close(ga[live], gb[live], rtol=1e-5, atol=1e-6)
    assert torch.all(gb[~live] == 0)


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_compute_approx_kl_bf16(est):
    """Both upcast bf16 inputs to fp32 before the math, so the values agree at fp32 tolerance; the gradient
    comes back in bf16 from both."""
    lp, ref = _pair((4, 53), torch.bfloat16, 0.5)
    a = lp.clone().requires_grad_()
    b = lp.clone().requires_grad_()
    ours = token_kl(a, ref, est)
    theirs = orl.compute_approx_kl(b, ref, kl_estimator=est)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    (ga,) = torch.autograd.grad(ours.sum(), a)
    (gb,) = torch.autograd.grad(theirs.sum(), b)
    assert ga.dtype == gb.dtype == torch.bfloat16
    torch.testing.assert_close(ga.float(), gb.float(), **tol(torch.bfloat16))


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_unbiased_gradient_is_k2_gradient_times_is_weight(est):
    """OpenRLHF's unbiased_gradient keeps the estimator's value and backpropagates w * (lp - ref), w =
    min(pi / pi_old, 10) detached: with ours, the chosen estimator's value plus w times k2's gradient."""
    lp, ref = _pair((3, 29), torch.float32, 0.5)
    old = lp + 0.1 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(4))
    a = lp.clone().requires_grad_()
    b = lp.clone().requires_grad_()
    w = (lp - old).exp().clamp(max=10.0)
    k2 = token_kl(a, ref, "k2")
    ours = token_kl(a, ref, est).detach() + w * (k2 - k2.detach())
    theirs = orl.compute_approx_kl(b, ref, log_probs_old=old, kl_estimator=est, unbiased_gradient=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), a)[0], torch.autograd.grad(theirs.sum(), b)[0],
                               rtol=1e-5, atol=1e-6)
