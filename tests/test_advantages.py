import math

import pytest
import torch

from score_kernels import (
    token_advantages,
    token_advantages_reference,
    turn_advantages,
    turn_advantages_reference,
)
from score_kernels.advantages import ESTIMATORS
from tests.helpers import device, live_backends

DEV = device()
BACKENDS = [b for b in live_backends(DEV) if b != "triton"]

# Hand-computed case: groups of sizes 1 (id 7), 2 (id 3) and 4 (id -2), shuffled.
IDS = [-2, 3, 7, -2, 3, -2, -2]
R = [[1, 1], [0, 1], [1, 0], [0, 0], [1, 1], [0, 1], [1, 1]]


def _case(dtype=torch.float32):
    return torch.tensor(R, dtype=dtype, device=DEV), torch.tensor(IDS, device=DEV)


def _check(got, want):
    assert got.dtype == torch.float32 and got.shape == (len(IDS), 2)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64, device=got.device),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rloo_groups_1_2_4_shuffled(backend):
    r, g = _case()
    want = [[2 / 3, 1 / 3], [-1, 0], [1, 0], [-2 / 3, -1], [1, 0], [-2 / 3, 1 / 3], [2 / 3, 1 / 3]]
    _check(turn_advantages(r, g, estimator="rloo", backend=backend), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_bonus_alpha_10(backend):
    r, g = _case()
    # r'_1 = r_1 + 10 (r_1 - r_0)
    shaped = [[1, 1], [0, 11], [1, -10], [0, 0], [1, 1], [0, 11], [1, 1]]
    _check(turn_advantages(r, g, estimator="none", shaping_alpha=10.0, backend=backend), shaped)
    want = [[2 / 3, -3], [-1, 10], [1, -10], [-2 / 3, -13 / 3], [1, -10], [-2 / 3, 31 / 3], [2 / 3, -3]]
    _check(turn_advantages(r, g, estimator="rloo", shaping_alpha=10.0, backend=backend), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_without_and_with_std(backend):
    r, g = _case()
    want = [[0.5, 0.25], [-0.5, 0], [0, 0], [-0.5, -0.75], [0.5, 0], [-0.5, 0.25], [0.5, 0.25]]
    _check(turn_advantages(r, g, estimator="grpo", backend=backend), want)
    eps = 1e-6
    c0, b0, c1 = math.sqrt(1 / 3) + eps, math.sqrt(0.5) + eps, 0.5 + eps  # unbiased stds + eps
    want_std = [[0.5 / c0, 0.25 / c1], [-0.5 / b0, 0], [0, 0], [-0.5 / c0, -0.75 / c1], [0.5 / b0, 0],
                [-0.5 / c0, 0.25 / c1], [0.5 / c0, 0.25 / c1]]  # group of one: std 1; B turn 1: std 0
    _check(turn_advantages(r, g, estimator="grpo", std_normalize=True, eps=eps, backend=backend), want_std)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reinforce_and_none(backend):
    r, g = _case()
    want = [[x[0] - 4 / 7, x[1] - 5 / 7] for x in R]
    _check(turn_advantages(r, g, estimator="reinforce", backend=backend), want)
    _check(turn_advantages(r, g, estimator="none", backend=backend), R)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("std", [False, True])
@pytest.mark.parametrize("B,K,G", [(1, 2, 1), (37, 2, 9), (300, 3, 300), (257, 1, 4)])
def test_random_vs_reference(backend, estimator, std, B, K, G):
    if std and estimator not in ("grpo", "reinforce"):
        pytest.skip("std applies to grpo/reinforce")
    gen = torch.Generator().manual_seed(B * 31 + K)
    r = torch.randn(B, K, generator=gen, dtype=torch.float64).to(DEV)
    ids = (torch.randint(0, G, (B,), generator=gen) * 7919 - 1000).to(DEV)  # arbitrary, unsorted ids
    for dtype in (torch.float32, torch.float64):
        got = turn_advantages(r.to(dtype), ids, estimator=estimator, shaping_alpha=2.5, std_normalize=std,
                              backend=backend)
        want = turn_advantages_reference(r.to(dtype), ids, estimator, 2.5, std)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_advantages_dense_and_packed(backend):
    vals = torch.tensor([[1.0, 2.0], [3.0, 4.0]], device=DEV)
    ids = torch.tensor([[-1, 0, 0, -1, 1, 1], [0, 1, -1, -1, -1, -1]], device=DEV)
    want = torch.tensor([[0, 1, 1, 0, 2, 2], [3, 4, 0, 0, 0, 0]], dtype=torch.float32, device=DEV)
    got = token_advantages(vals, ids, backend=backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    packed = torch.tensor([-1, 0, 0, -1, 1, 1, 0, 1, -1], device=DEV, dtype=torch.int32)
    cu = torch.tensor([0, 6, 9], device=DEV)
    torch.testing.assert_close(token_advantages(vals, packed, cu_seqlens=cu, backend=backend),
                               torch.tensor([0, 1, 1, 0, 2, 2, 3, 4, 0.0], device=DEV), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_advantages_random_vs_reference(backend):
    gen = torch.Generator().manual_seed(3)
    B, K, T = 13, 3, 77
    vals = torch.randn(B, K, generator=gen).to(DEV)
    ids = torch.randint(-1, K, (B, T), generator=gen).to(DEV)
    torch.testing.assert_close(token_advantages(vals, ids, backend=backend), token_advantages_reference(vals, ids),
                               rtol=0, atol=0)
    lens = torch.randint(0, 20, (B,), generator=gen)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(DEV)
    pid = torch.randint(-1, K, (int(lens.sum()),), generator=gen).to(DEV)
    torch.testing.assert_close(token_advantages(vals, pid, cu_seqlens=cu, backend=backend),
                               token_advantages_reference(vals, pid, cu), rtol=0, atol=0)


def test_no_grad_needed_and_compile_fullgraph():
    r, g = _case()
    ids = torch.tensor([[0, 0, 1, -1]] * len(IDS), device=DEV)

    def f(r, g, ids):
        a = turn_advantages(r, g, estimator="rloo", shaping_alpha=10.0)
        return token_advantages(a, ids) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(r, g, ids), f(r, g, ids))


def test_opcheck():
    r, g = _case()
    torch.library.opcheck(torch.ops.score.turn_advantages.default, (r, g, 0, 10.0, False, 1e-6, "torch"))
    ids = torch.tensor([[0, 1, -1]] * len(IDS), device=DEV)
    torch.library.opcheck(torch.ops.score.token_advantages.default, (r, ids, None, "torch"))


@pytest.mark.parametrize("bad,match", [
    (lambda r, g, ids: turn_advantages(r, g[:-1]), "group_ids"),
    (lambda r, g, ids: turn_advantages(r[0], g), "rewards"),
    (lambda r, g, ids: turn_advantages(r, g.float()), "group_ids"),
    (lambda r, g, ids: turn_advantages(torch.where(r > 0, r, float("nan")), g), "rewards"),
    (lambda r, g, ids: turn_advantages(r, g, estimator="ppo"), "estimator"),
    (lambda r, g, ids: turn_advantages(r, g, estimator="rloo", std_normalize=True), "std_normalize"),
    (lambda r, g, ids: turn_advantages(r, g, backend="nope"), "backend"),
    (lambda r, g, ids: turn_advantages(r, g, shaping_alpha=float("inf")), "shaping_alpha"),
    (lambda r, g, ids: turn_advantages(r, g, shaping_alpha=-float("inf")), "shaping_alpha"),
    (lambda r, g, ids: turn_advantages(r, g, shaping_alpha=float("nan")), "shaping_alpha"),
    (lambda r, g, ids: token_advantages(r, ids[:-1]), "turn_ids"),
    (lambda r, g, ids: token_advantages(r, ids + 1), "turn_ids"),  # turn id 2 >= K=2
    (lambda r, g, ids: token_advantages(r, ids.float()), "turn_ids"),
    (lambda r, g, ids: token_advantages(r, ids.reshape(-1), cu_seqlens=torch.tensor([0, 3])), "cu_seqlens"),
    (lambda r, g, ids: token_advantages(r[:2], ids.reshape(-1)[:5], cu_seqlens=torch.tensor([0, 3, 9])),
     "cu_seqlens"),
])
def test_bad_input_raises_value_error(bad, match):
    r, g = _case()
    r, g = r.cpu(), g.cpu()
    ids = torch.tensor([[0, 1, -1]] * len(IDS))
    with pytest.raises(ValueError, match=match):
        bad(r, g, ids)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [7, 1024, 20000])
def test_gpu_cuda_matches_reference_no_sync(B):
    if "cuda" not in live_backends("cuda"):
        pytest.skip("cuda ext not live")
    gen = torch.Generator().manual_seed(B)
    r = torch.randint(0, 2, (B, 2), generator=gen).float().cuda()
    ids = torch.randperm(B, generator=gen).cuda() // 8  # groups of 8, shuffled
    T = 64
    tids = torch.randint(-1, 2, (B, T), generator=gen).cuda()
    for est, std in (("rloo", False), ("grpo", True), ("reinforce", False), ("none", False)):
        want = turn_advantages_reference(r, ids, est, 10.0, std)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = turn_advantages(r, ids, estimator=est, shaping_alpha=10.0, std_normalize=std, backend="cuda")
            tok = token_advantages(got, tids, backend="cuda")
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tok, token_advantages_reference(want, tids), rtol=1e-5, atol=1e-5)
