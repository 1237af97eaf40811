"""Liger-Kernel (0.8.5) as the oracle for linear_logprobs + policy_loss and for linear_kl.

- liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss: a chunked torch implementation (runs on a CPU with
  compiled=False) of the PPO-clipped GRPO loss with a k3 KL to the reference, from hidden states.
- liger_kernel.chunked_loss.LigerFusedLinearJSDLoss with beta=1 (and no hard loss): the token mean of
  KL(student || teacher) over the full vocabulary, from hidden states; torch, runs on a CPU.
- liger_kernel.transformers.LigerFusedLinearJSD: the same loss as Triton kernels, CUDA only (gpu-marked).
"""
import pytest
import torch

from score_kernels import linear_kl, linear_logprobs, policy_loss
from tests.conftest import tol
from tests.external._peers import need

chunked = need("liger_kernel.chunked_loss")


def _grpo_batch(B, T, H, V, dtype, seed=0, empty_row=False, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, H, generator=g) * 0.5).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.1).to(dtype) if bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) < 0.8).long()
    mask[:, 0] = 1
    if empty_row:
        mask[1] = 0
    adv = torch.randn(B, generator=g)
    with torch.no_grad():  # old and ref near the current policy, so ratios straddle the clip range
        lp = linear_logprobs(hidden.float(), weight.float(), ids, None if b is None else b.float())
        old = lp + 0.3 * torch.randn(B, T, generator=g)
        ref = lp + 0.3 * torch.randn(B, T, generator=g)
    return hidden, weight, b, ids, mask, adv, old, ref


def _ours(hidden, weight, b, ids, mask, adv, old, ref, *, beta, eps, temperature, agg):
    lp = linear_logprobs(hidden, weight, ids, b, temperature=temperature)
    turn_ids = torch.where(mask > 0, 0, -1)
    A = adv[:, None].expand_as(lp).contiguous()
    return policy_loss(lp, A, turn_ids, old_logprobs=old, ref_logprobs=ref, kl_coef=beta, kl_estimator="k3",
                       clip_eps=(eps, eps), agg=agg)


def _liger(hidden, weight, b, ids, mask, adv, old, ref, *, beta, eps, temperature, loss_type):
    fn = chunked.LigerFusedLinearGRPOLoss(beta=beta, compiled=False, use_ref_model=True, chunk_size=2,
                                          epsilon_low=eps, epsilon_high=eps, loss_type=loss_type,
                                          temperature=temperature)
    return fn(hidden, weight, ids, mask, adv, bias=b, ref_per_token_logps=ref, old_per_token_logps=old)


# Liger's loss types and our aggregations. "grpo" divides the sum of per-sequence token means by B (every row);
# ours by the rows that have a policy token: the difference is applied as ours * S / B.
LOSS_TYPES = {"bnpo": "token-mean", "dapo": "token-mean", "grpo": "seq-mean-token-mean"}


@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("shape", [(3, 7, 16, 41), (2, 13, 8, 129)])
def test_grpo_loss_fp32(loss_type, temperature, shape):
    B, T, H, V = shape
    batch = _grpo_batch(B, T, H, V, torch.float32, bias=(V == 129), empty_row=(loss_type == "grpo"))
    hidden, weight, b, ids, mask, adv, old, ref = batch
    kw = dict(beta=0.04, eps=0.2, temperature=temperature)
    mine = [x.clone().requires_grad_() if x is not None else None for x in (hidden, weight, b)]
    theirs_in = [x.clone().requires_grad_() if x is not None else None for x in (hidden, weight, b)]
    ours, stats = _ours(*mine, ids, mask, adv, old, ref, agg=LOSS_TYPES[loss_type], **kw)
    theirs, (kl_metric, _clip) = _liger(*theirs_in, ids, mask, adv, old, ref, loss_type=loss_type, **kw)
    if loss_type == "grpo":
        ours = ours * stats["seqs"] / B
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["kl_mean"], kl_metric, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(ours, [x for x in mine if x is not None])
    grads_t = torch.autograd.grad(theirs, [x for x in theirs_in if x is not None])
    for g, gt in zip(grads, grads_t):
        torch.testing.assert_close(g, gt, rtol=1e-4, atol=1e-6)


def test_grpo_loss_bf16():
    """Liger rounds each logits chunk to bf16 (bf16 matmul) before its fp32 log_softmax; ours accumulates
    the projection in fp32. Both are compared with the oracle run on the fp32 upcast of the same bf16
    values, at bf16 tolerance for the loss and the bf16 gradients."""
    batch = _grpo_batch(3, 9, 16, 67, torch.bfloat16)
    hidden, weight, b, ids, mask, adv, old, ref = batch
    kw = dict(beta=0.04, eps=0.2, temperature=1.0)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ours, _ = _ours(h, w, None, ids, mask, adv, old, ref, agg="token-mean", **kw)
    h32, w32 = hidden.float().requires_grad_(), weight.float().requires_grad_()
    theirs, _ = _liger(h32, w32, None, ids, mask, adv, old, ref, loss_type="bnpo", **kw)
    t = tol(torch.bfloat16)
    torch.testing.assert_close(ours, theirs, **t)
    gh, gw = torch.autograd.grad(ours, [h, w])
    gh32, gw32 = torch.autograd.grad(theirs, [h32, w32])
    assert gh.dtype == gw.dtype == torch.bfloat16
    torch.testing.assert_close(gh.float(), gh32, rtol=t["rtol"], atol=t["atol"] * float(gh32.abs().max()))
    torch.testing.assert_close(gw.float(), gw32, rtol=t["rtol"], atol=t["atol"] * float(gw32.abs().max()))


def _jsd_batch(N, H, Ht, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
    th = torch.randn(N, Ht, generator=g).to(dtype)
    tw = (torch.randn(V, Ht, generator=g) * 0.3).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.3] = -100
    return h, w, th, tw, labels


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("shape", [(37, 16, 16, 53), (5, 8, 24, 1031)])  # teacher hidden size may differ
def test_linear_kl_vs_chunked_jsd_beta1(temperature, shape):
    """beta=1 is KL(student || teacher), summed over the vocabulary, averaged over tokens whose label is not
    ignore_index. Ours per token with mask = (label != -100); the token mean is taken here."""
    N, H, Ht, V = shape
    h, w, th, tw, labels = _jsd_batch(N, H, Ht, V, torch.float32)
    mask = labels != -100
    a, aw = h.clone().requires_grad_(), w.clone().requires_grad_()
    b, bw = h.clone().requires_grad_(), w.clone().requires_grad_()
    ours = linear_kl(a, aw, th, tw, mask=mask, temperature=temperature).sum() / mask.sum()
    jsd = chunked.LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0, ignore_index=-100,
                                          temperature=temperature, compiled=False, chunk_size=8)
    theirs = jsd(b, bw, th, tw, labels)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for g, gt in zip(torch.autograd.grad(ours, [a, aw]), torch.autograd.grad(theirs, [b, bw])):
        torch.testing.assert_close(g, gt, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
def test_linear_kl_vs_triton_fused_linear_jsd_beta1():
    """Liger's Triton LigerFusedLinearJSD (jsd_beta=1: KL(student || teacher)); its kernels need CUDA."""
    lt = need("liger_kernel.transformers")
    h, w, th, tw, labels = (x.cuda() for x in _jsd_batch(64, 32, 32, 4099, torch.float32))
    mask = labels != -100
    a, aw = h.clone().requires_grad_(), w.clone().requires_grad_()
    b, bw = h.clone().requires_grad_(), w.clone().requires_grad_()
    ours = linear_kl(a, aw, th, tw, mask=mask).sum() / mask.sum()
    theirs = lt.LigerFusedLinearJSD(jsd_beta=1.0, ignore_index=-100)(b, bw, th, tw, labels)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    for g, gt in zip(torch.autograd.grad(ours, [a, aw]), torch.autograd.grad(theirs, [b, bw])):
        torch.testing.assert_close(g, gt, rtol=1e-3, atol=1e-5)
