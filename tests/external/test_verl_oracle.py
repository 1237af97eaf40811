"""verl's own functions (verl.trainer.ppo.core_algos, verl 0.9.1) as oracles for token_kl, turn_advantages
and policy_loss's aggregation. Where verl differs on purpose, the test names the difference and applies it
to our output before comparing."""
import numpy as np
import pytest
import torch

from score_kernels import policy_loss, token_advantages, token_kl, turn_advantages
from tests.conftest import tol
from tests.external._peers import need

ca = need("verl.trainer.ppo.core_algos")

# verl's kl_penalty names for our estimators
VERL_KL = {"k1": "k1", "k2": "k2", "k3": "low_var_kl", "abs": "abs"}


def _pair(shape, dtype, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref = -torch.rand(shape, generator=g, dtype=torch.float64) * 4
    lp = ref + torch.randn(shape, generator=g, dtype=torch.float64) * scale
    return lp.to(dtype), ref.to(dtype)


def _verl_kl_difference(ours: torch.Tensor, est: str) -> torch.Tensor:
    """verl's low_var_kl clamps log(ref/pi) to [-20, 20] and the estimate to [-10, 10]. Since
    k3 >= 0 and k3(+-20) > 10, both clamps together equal min(k3, 10); the other estimators are unclamped."""
    return ours.clamp(max=10.0) if est == "k3" else ours


@pytest.mark.parametrize("est", ["k1", "k2", "k3", "abs"])
@pytest.mark.parametrize("shape", [(3, 37), (129,), (2, 5, 7)])
@pytest.mark.parametrize("scale", [0.3, 30.0])  # 30: most k3 entries past verl's clamps
def test_kl_penalty_fp32(est, shape, scale):
    lp, ref = _pair(shape, torch.float32, scale)
    ours_in = lp.clone().requires_grad_()
    theirs_in = lp.clone().requires_grad_()
    raw = token_kl(ours_in, ref, est)
    theirs = ca.kl_penalty(theirs_in, ref, VERL_KL[est])
    torch.testing.assert_close(_verl_kl_difference(raw, est), theirs, rtol=1e-5, atol=1e-6)
    # Gradients: verl's clamp zeroes them where it bites; elsewhere they equal ours. (Ours is not clamped
    # and k3's derivative 1 - exp(-delta) may overflow there, which is the true value, not an error.)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    (gours,) = torch.autograd.grad((raw * w).sum(), ours_in)
    (gtheirs,) = torch.autograd.grad((theirs * w).sum(), theirs_in)
    live = raw.detach() < 10.0 if est == "k3" else torch.ones(shape, dtype=torch.bool)
    torch.testing.assert_close(gours[live], gtheirs[live], rtol=1e-5, atol=1e-6)
    assert torch.all(gtheirs[~live] == 0)
    if scale > 1 and est == "k3":
        assert (~live).sum() > live.numel() // 2  # the clamp really was exercised


@pytest.mark.parametrize("est", ["k1", "k2", "k3", "abs"])
def test_kl_penalty_bf16(est):
    """verl computes in the input dtype (bf16 exp and subtraction); ours reads bf16 and computes in fp32. So
    ours on bf16 inputs equals verl on the same values upcast to fp32 (fp32 tolerance), and verl's own bf16
    result within bf16 tolerance."""
    lp, ref = _pair((4, 61), torch.bfloat16, 0.5)
    ours_in = lp.clone().requires_grad_()
    ours = _verl_kl_difference(token_kl(ours_in, ref, est), est)
    assert ours.dtype == torch.float32
    up_in = lp.float().requires_grad_()
    theirs_fp32 = ca.kl_penalty(up_in, ref.float(), VERL_KL[est])
    torch.testing.assert_close(ours, theirs_fp32, rtol=1e-5, atol=1e-6)
    theirs_bf16 = ca.kl_penalty(lp, ref, VERL_KL[est])
    assert theirs_bf16.dtype == torch.bfloat16
    t = tol(torch.bfloat16)
    torch.testing.assert_close(ours, theirs_bf16.float(), rtol=4 * t["rtol"], atol=4 * t["atol"])
    (g,) = torch.autograd.grad(ours.sum(), ours_in)
    (gt,) = torch.autograd.grad(theirs_fp32.sum(), up_in)
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(g.float(), gt, **tol(torch.bfloat16))


def test_kl_penalty_straight_through_k3_plus():
    """verl's "k3+" has k3's value and k2's gradient (delta); composed from our two estimators."""
    lp, ref = _pair((5, 33), torch.float32, 0.5)
    a = lp.clone().requires_grad_()
    b = lp.clone().requires_grad_()
    k2 = token_kl(a, ref, "k2")
    ours = k2 - k2.detach() + token_kl(a, ref, "k3").detach()
    theirs = ca.kl_penalty(b, ref, "k3+")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), a)[0], torch.autograd.grad(theirs.sum(), b)[0])


# ----------------------------------------------------------------------------- outcome advantages
def _outcome_batch(group_sizes, L=9, seed=0, equal_lengths=False):
    """verl's layout: the outcome reward on the last response token, response_mask [B, L], index [B]."""
    g = torch.Generator().manual_seed(seed)
    index = np.concatenate([np.full(n, f"uid{i}") for i, n in enumerate(group_sizes)])
    perm = torch.randperm(len(index), generator=g).numpy()  # groups need not be contiguous
    index = index[perm]
    B = len(index)
    scores = (torch.rand(B, generator=g) < 0.5).float() + 0.1 * torch.randn(B, generator=g)
    lengths = torch.full((B,), L) if equal_lengths else torch.randint(1, L + 1, (B,), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).float()
    tlr = torch.zeros(B, L)
    tlr[torch.arange(B), lengths - 1] = scores
    _, gid = np.unique(index, return_inverse=True)
    return tlr, mask, index, scores, torch.as_tensor(gid, dtype=torch.long)


def _ours_tokens(A, mask):
    turn_ids = torch.where(mask > 0, 0, -1)
    return token_advantages(A, turn_ids)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("fn", ["compute_grpo_outcome_advantage", "compute_grpo_vectorized_outcome_advantage"])
def test_grpo_outcome_advantage(norm, fn):
    """Difference: a group of one. verl gives it mean 0 and std 1 (so A = r / (1 + eps)); ours gives it its
    own mean (A = 0: a lone sample carries no relative signal). The singleton rows are checked apart."""
    tlr, mask, index, scores, gid = _outcome_batch([4, 3, 1, 5, 2, 1])
    theirs, _ = getattr(ca, fn)(tlr, mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=norm)
    A = turn_advantages(scores[:, None], gid, estimator="grpo", std_normalize=norm, eps=1e-6)
    ours = _ours_tokens(A, mask)
    single = torch.as_tensor([(index == u).sum() == 1 for u in index])
    torch.testing.assert_close(ours[~single], theirs[~single], rtol=1e-5, atol=1e-6)
    assert torch.all(ours[single] == 0)
    if fn == "compute_grpo_outcome_advantage":
        denom = 1 + 1e-6 if norm else 1.0
        torch.testing.assert_close(theirs[single], (scores[single, None] / denom) * mask[single])


def test_grpo_constant_group_is_zero_in_both():
    tlr, mask, index, scores, gid = _outcome_batch([4, 3])
    scores = torch.where(torch.as_tensor(index == index[0]), 1.0, scores)
    tlr = torch.where(tlr != 0, 0.0, tlr)
    last = mask.sum(1).long() - 1
    tlr[torch.arange(len(index)), last] = scores
    theirs, _ = ca.compute_grpo_outcome_advantage(tlr, mask, index)
    ours = _ours_tokens(turn_advantages(scores[:, None], gid, estimator="grpo", std_normalize=True), mask)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert torch.all(ours[torch.as_tensor(index == index[0])] == 0)


@pytest.mark.parametrize("fn", ["compute_rloo_outcome_advantage", "compute_rloo_vectorized_outcome_advantage"])
def test_rloo_outcome_advantage(fn):
    """Same leave-one-out semantics. A group of one: ours and verl's loop version give baseline 0 (A = r);
    verl's vectorized version gives A = 0 (it multiplies by count > 1), so verl disagrees with itself there.
    The singleton rows are checked apart, against each verl function's own convention."""
    tlr, mask, index, scores, gid = _outcome_batch([4, 3, 1, 6, 2])
    theirs, _ = getattr(ca, fn)(tlr, mask, index)
    ours = _ours_tokens(turn_advantages(scores[:, None], gid, estimator="rloo"), mask)
    single = torch.as_tensor([(index == u).sum() == 1 for u in index])
    torch.testing.assert_close(ours[~single], theirs[~single], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[single], scores[single, None] * mask[single])
    if fn == "compute_rloo_vectorized_outcome_advantage":
        assert torch.all(theirs[single] == 0)
    else:
        torch.testing.assert_close(theirs[single], ours[single])


def _verl_whiten_scale(centered_tokens, mask):
    """verl's masked_whiten scale: rsqrt(unbiased token-weighted variance over response tokens + 1e-8)."""
    n = mask.sum()
    mean = (centered_tokens * mask).sum() / n
    var = (((centered_tokens - mean) ** 2) * mask).sum() / n * n / (n - 1)
    return torch.rsqrt(var + 1e-8), mean


def test_reinforce_plus_plus_outcome_advantage():
    """verl's REINFORCE++ (gamma = 1, outcome reward) whitens the broadcast reward over all response tokens:
    token-weighted mean and unbiased token variance, rsqrt(var + 1e-8). Ours ("reinforce") subtracts the
    batch mean per sequence; with equal response lengths the means agree, and the scale is verl's whitening
    applied to our centred advantages (ours with std_normalize divides by the unbiased *sequence* std + eps,
    a different Bessel factor, so the normalised outputs are compared through that ratio)."""
    from verl.trainer.config import AlgoConfig

    tlr, mask, index, scores, gid = _outcome_batch([5, 3, 4], equal_lengths=True)
    theirs, _ = ca.compute_reinforce_plus_plus_outcome_advantage(tlr, mask, config=AlgoConfig(gamma=1.0))
    centered = _ours_tokens(turn_advantages(scores[:, None], gid, estimator="reinforce"), mask)
    scale, mean = _verl_whiten_scale(centered, mask)
    assert abs(float(mean)) < 1e-6  # equal lengths: token mean == sequence mean
    torch.testing.assert_close(centered * scale, theirs, rtol=1e-5, atol=1e-6)
    normed = _ours_tokens(turn_advantages(scores[:, None], gid, estimator="reinforce", std_normalize=True), mask)
    # verl's variance over ours on the same centred values: (L * sum c^2 / (N - 1)) / (sum c^2 / (B - 1))
    B, L, N = scores.shape[0], mask.shape[1], mask.sum()
    bessel = torch.sqrt(L * (B - 1) / (N - 1))
    torch.testing.assert_close(normed, theirs * bessel, rtol=1e-4, atol=1e-5)


def test_reinforce_plus_plus_baseline_outcome_advantage():
    """verl's RF++-baseline: group mean subtracted (our "grpo" without std), then verl's batch whitening."""
    tlr, mask, index, scores, gid = _outcome_batch([4, 3, 5, 2], equal_lengths=True)
    theirs, _ = ca.compute_reinforce_plus_plus_baseline_outcome_advantage(tlr, mask, index)
    centered = _ours_tokens(turn_advantages(scores[:, None], gid, estimator="grpo"), mask)
    scale, mean = _verl_whiten_scale(centered, mask)
    torch.testing.assert_close((centered - mean) * scale * mask, theirs, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- loss aggregation
def _agg_batch(B=6, T=13, seed=0, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    loss_mat = torch.randn(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) < 0.7).float()
    mask[0, 0] = 1.0
    if empty_row:
        mask[2] = 0.0  # a fully masked sequence: both exclude it from the sequence count
    lp = -torch.rand(B, T, generator=g) * 3
    return loss_mat, mask, lp


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_agg_loss_modes(mode, dtype):
    """policy_loss with ratio 1 and no KL is agg(-A): A = -loss_mat makes it verl's agg_loss(loss_mat). The
    gradient is compared with autograd through verl's vanilla REINFORCE surrogate -A * exp(lp - lp.detach())."""
    loss_mat, mask, lp = _agg_batch()
    turn_ids = torch.where(mask > 0, 0, -1)
    lp_ours = lp.to(dtype).requires_grad_()
    ours, _ = policy_loss(lp_ours, (-loss_mat).to(dtype), turn_ids, agg=mode)
    lp_theirs = lp.to(dtype).float().requires_grad_()
    A = (-loss_mat).to(dtype).float()
    surrogate = -A * torch.exp(lp_theirs - lp_theirs.detach())
    theirs = ca.agg_loss(surrogate, mask, mode)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ca.agg_loss(A.neg(), mask, mode), theirs)  # the surrogate's value is -A
    (g,) = torch.autograd.grad(ours, lp_ours)
    (gt,) = torch.autograd.grad(theirs, lp_theirs)
    assert g.dtype == dtype
    torch.testing.assert_close(g.float(), gt, **tol(dtype))
    assert torch.all(g[mask == 0] == 0)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_agg_loss_global_counts(mode):
    """Data-parallel form. verl: masked_sum / global count * dp_size (FSDP then averages the ranks'
    gradients); ours: masked_sum / global count (ranks' gradients are summed). Difference applied: ours *
    dp_size. verl's token-mean reads batch_num_tokens, its seq modes global_batch_size; our
    global_token_count is read as the one that fits agg."""
    loss_mat, mask, lp = _agg_batch(seed=3)
    turn_ids = torch.where(mask > 0, 0, -1)
    dp = 4
    count = 57 if mode == "token-mean" else 19
    kw = {"batch_num_tokens": count} if mode == "token-mean" else {"global_batch_size": count}
    theirs = ca.agg_loss(loss_mat, mask, mode, dp_size=dp, **kw)
    ours, _ = policy_loss(lp, -loss_mat, turn_ids, agg=mode, global_token_count=count)
    torch.testing.assert_close(ours * dp, theirs, rtol=1e-5, atol=1e-6)
