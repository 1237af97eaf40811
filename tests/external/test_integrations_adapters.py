"""score_kernels.integrations' adapters against the peer functions whose signatures they take."""
import pytest
import torch

import score_kernels.integrations as integ
from tests.conftest import tol
from tests.external._peers import need


def _logits(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 2, torch.randint(0, shape[-1], shape[:-1], generator=g)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_trl_selective_log_softmax_adapter(temperature):
    tu = need("trl.trainer.utils")
    x, t = _logits((3, 9, 131))
    mask = torch.rand(3, 9, generator=torch.Generator().manual_seed(2)) < 0.7
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = integ.selective_log_softmax(a, t, temperature=temperature, row_mask=mask)
    theirs = tu.selective_log_softmax(b, t, temperature=temperature, row_mask=mask)
    torch.testing.assert_close(ours, theirs, **tol(torch.float32))
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), a)[0], torch.autograd.grad(theirs.sum(), b)[0],
                               **tol(torch.float32))
    with pytest.raises(ValueError, match="index"):
        integ.selective_log_softmax(x, t[..., None].expand(3, 9, 2))  # top-K gathering is not supported


def test_trl_entropy_from_logits_adapter():
    tu = need("trl.trainer.utils")
    x, _ = _logits((2, 7, 65))
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = integ.entropy_from_logits(a), tu.entropy_from_logits(b, chunk_size=4)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), a)[0], torch.autograd.grad(theirs.sum(), b)[0],
                               rtol=1e-5, atol=1e-6)


def test_trl_add_fused_lm_head_rejects_unsupported_outputs():
    need("trl.trainer.utils")
    with pytest.raises(ValueError, match="outputs"):
        integ.add_fused_lm_head(torch.nn.Linear(2, 2), outputs=("log_probs", "is_top1"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verl_linear_cross_entropy_adapter_vs_fused_linear_for_ppo(dtype):
    """verl's torch FusedLinearForPPO (CPU) as the oracle; its Triton linear_cross_entropy is checked on a GPU."""
    tf = need("verl.utils.experimental.torch_functional")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 13, 24, generator=g).to(dtype)
    weight = (torch.randn(211, 24, generator=g) * 0.3).to(dtype)
    labels = torch.randint(0, 211, (2, 13), generator=g)
    a, aw = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b, bw = hidden.float().requires_grad_(), weight.float().requires_grad_()
    lp, ent = integ.linear_cross_entropy(a, aw, labels, 0.7)
    assert lp.shape == ent.shape == (26,) and lp.dtype == ent.dtype == torch.float32
    lp_t, ent_t = tf.FusedLinearForPPO(chunk_size=5)(b, bw, labels, temperature=0.7)
    t = tol(dtype) if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(lp, lp_t.reshape(-1), **t)
    torch.testing.assert_close(ent, ent_t.reshape(-1), **t)
    w = torch.randn(26, generator=g)
    ga = torch.autograd.grad((lp * w).sum() + ent.sum(), [a, aw])
    gb = torch.autograd.grad((lp_t.reshape(-1) * w).sum() + ent_t.sum(), [b, bw])
    for x, y in zip(ga, gb):
        assert x.dtype == dtype
        torch.testing.assert_close(x.float(), y, rtol=t["rtol"], atol=t["atol"] * max(1.0, float(y.abs().max())))
    with pytest.raises(ValueError, match="reduction"):
        integ.linear_cross_entropy(hidden, weight, labels, 1.0, "mean")


@pytest.mark.gpu
def test_verl_linear_cross_entropy_adapter_vs_triton_kernel():
    lce = need("verl.utils.kernel.linear_cross_entropy")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(257, 64, generator=g).cuda().requires_grad_()
    weight = (torch.randn(4099, 64, generator=g) * 0.2).cuda().requires_grad_()
    labels = torch.randint(0, 4099, (257,), generator=g).cuda()
    lp, ent = integ.linear_cross_entropy(hidden, weight, labels, 0.9)
    lp_t, ent_t = lce.linear_cross_entropy(hidden, weight, labels, 0.9, "none")
    torch.testing.assert_close(lp, lp_t, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent, ent_t, rtol=1e-4, atol=1e-4)
    ga = torch.autograd.grad(lp.sum() + ent.sum(), [hidden, weight])
    gb = torch.autograd.grad(lp_t.sum() + ent_t.sum(), [hidden, weight])
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_openrlhf_compute_approx_kl_adapter(est, unbiased):
    from tests.external.test_openrlhf_oracle import _load_openrlhf_utils

    orl = _load_openrlhf_utils()
    g = torch.Generator().manual_seed(0)
    ref = -torch.rand(4, 17, generator=g) * 3
    lp = ref + torch.randn(4, 17, generator=g) * 6  # some entries past the clamps
    old = lp + 0.2 * torch.randn(4, 17, generator=g)
    a, b = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    ours = integ.compute_approx_kl(a, ref, old, kl_estimator=est, unbiased_gradient=unbiased)
    theirs = orl.compute_approx_kl(b, ref, old, kl_estimator=est, unbiased_gradient=unbiased)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), a)[0], torch.autograd.grad(theirs.sum(), b)[0],
                               rtol=1e-5, atol=1e-6)


def test_openrlhf_log_probs_from_logits_adapter():
    from tests.external.test_openrlhf_oracle import _load_openrlhf_utils

    orl = _load_openrlhf_utils()
    x, t = _logits((3, 8, 77))
    ours = integ.log_probs_from_logits(x, t, temperature=0.8)
    theirs = orl.log_probs_from_logits(x.clone(), t, temperature=0.8)  # OpenRLHF divides its argument in place
    torch.testing.assert_close(ours, theirs, **tol(torch.float32))
