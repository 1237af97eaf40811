import math

import pytest
import torch

from score_kernels import KL_ESTIMATORS, policy_loss, policy_loss_reference, token_advantages
from score_kernels.policy_loss import AGGS
from tests.helpers import device, live_backends

DEV = device()
BACKENDS = [b for b in live_backends(DEV) if b != "triton"]
NAN = float("nan")

# Hand-computed case. Row 2 is all masked and holds NaNs, which must not leak anywhere.
IDS = [[-1, 0, 0, 1], [0, 1, -1, -1], [-1, -1, -1, -1]]
ADV = [[9.0, 1.0, 1.0, 2.0], [-1.0, 0.5, 7.0, 7.0], [NAN, NAN, NAN, NAN]]
# with ratio 1: row 0 terms -1, -1, -2 (sum -4, n 3); row 1 terms 1, -0.5 (sum 0.5, n 2)
HAND = {
    "token-mean": (-3.5 / 5, lambda a, n, s: -a / 5),
    "seq-mean-token-sum": (-3.5 / 2, lambda a, n, s: -a / 2),
    "seq-mean-token-mean": ((-4 / 3 + 0.25) / 2, lambda a, n, s: -a / (n * 2)),
}


def _hand(dtype=torch.float32):
    ids = torch.tensor(IDS, device=DEV)
    adv = torch.tensor(ADV, device=DEV)
    lp = torch.tensor([[NAN, -1.0, -2.0, -0.5], [-0.3, -0.7, NAN, 1.0], [NAN] * 4], device=DEV, dtype=dtype)
    return lp.requires_grad_(True), adv, ids


def _want_grad(fn):
    g = torch.zeros(3, 4, dtype=torch.float64)
    for b in range(3):
        n = sum(1 for t in IDS[b] if t >= 0)
        for t in range(4):
            if IDS[b][t] >= 0:
                g[b, t] = fn(ADV[b][t], n, b)
    return g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_every_agg_hand_computed(backend, agg):
    lp, adv, ids = _hand()
    loss, stats = policy_loss(lp, adv, ids, agg=agg, backend=backend)
    want, gfn = HAND[agg]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert math.isclose(float(loss), want, rel_tol=1e-6)
    (g,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(g.double().cpu(), _want_grad(gfn), rtol=1e-6, atol=0)
    assert float(stats["tokens"]) == 5 and float(stats["seqs"]) == 2
    assert float(stats["tokens_turn0"]) == 3 and float(stats["tokens_turn1"]) == 2
    assert math.isclose(float(stats["adv_turn0"]), 1 / 3, rel_tol=1e-6)
    assert math.isclose(float(stats["adv_turn1"]), 1.25, rel_tol=1e-6)
    assert float(stats["ratio_mean"]) == 1.0 and float(stats["clip_frac"]) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_token_count(backend):
    lp, adv, ids = _hand()
    for gc in (10, torch.tensor(10.0, device=DEV)):
        loss, _ = policy_loss(lp, adv, ids, global_token_count=gc, backend=backend)
        assert math.isclose(float(loss), -3.5 / 10, rel_tol=1e-6)
        (g,) = torch.autograd.grad(loss, lp)
        torch.testing.assert_close(g.double().cpu(), _want_grad(lambda a, n, b: -a / 10), rtol=1e-6, atol=0)
    # seq modes read it as the global sequence count
    loss, _ = policy_loss(lp, adv, ids, agg="seq-mean-token-sum", global_token_count=4, backend=backend)
    assert math.isclose(float(loss), -3.5 / 4, rel_tol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_per_turn_kl_coef_hand_computed(backend, estimator):
    lp, _, ids = _hand()
    adv = torch.zeros(3, 4, device=DEV)
    d = torch.tensor([[0.0, 0.5, 0.5, 1.0], [0.2, -0.4, 0.0, 0.0], [0.0] * 4], device=DEV)
    ref = (lp.detach() - d).nan_to_num(0.0)
    kl = (lambda x: x) if estimator == "k1" else (lambda x: math.exp(-x) + x - 1)
    dkl = (lambda x: 1.0) if estimator == "k1" else (lambda x: 1 - math.exp(-x))
    loss, stats = policy_loss(lp, adv, ids, ref_logprobs=ref, kl_coef=(0.1, 0.01), kl_estimator=estimator,
                              backend=backend)
    t0 = [0.5, 0.5, 0.2]  # turn-0 deltas
    t1 = [1.0, -0.4]
    want = (0.1 * sum(map(kl, t0)) + 0.01 * sum(map(kl, t1))) / 5
    assert math.isclose(float(loss), want, rel_tol=1e-5)
    assert math.isclose(float(stats["kl_turn0"]), sum(map(kl, t0)) / 3, rel_tol=1e-5)
    assert math.isclose(float(stats["kl_turn1"]), sum(map(kl, t1)) / 2, rel_tol=1e-5)
    assert math.isclose(float(stats["kl_loss"]), want, rel_tol=1e-5) and float(stats["pg_loss"]) == 0
    (g,) = torch.autograd.grad(loss, lp)
    want_g = torch.zeros(3, 4, dtype=torch.float64)
    for (b, t), x, c in [((0, 1), 0.5, 0.1), ((0, 2), 0.5, 0.1), ((1, 0), 0.2, 0.1), ((0, 3), 1.0, 0.01),
                         ((1, 1), -0.4, 0.01)]:
        want_g[b, t] = c * dkl(x) / 5
    torch.testing.assert_close(g.double().cpu(), want_g, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_clip_hand_computed(backend):
    # ratios 1.5, 1.5, 0.5, 0.5 with A = 1, -1, 1, -1 and eps 0.2: terms -1.2 (clipped), 1.5, -0.5, 0.8 (clipped)
    old = torch.zeros(1, 4, device=DEV)
    lp = torch.tensor([[math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5)]], device=DEV,
                      requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]], device=DEV)
    ids = torch.zeros(1, 4, dtype=torch.long, device=DEV)
    loss, stats = policy_loss(lp, adv, ids, old_logprobs=old, clip_eps=0.2, backend=backend)
    assert math.isclose(float(loss), (-1.2 + 1.5 - 0.5 + 0.8) / 4, rel_tol=1e-6)
    assert float(stats["clip_frac"]) == 0.5
    assert math.isclose(float(stats["ratio_mean"]), 1.0, rel_tol=1e-6)
    (g,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(g.cpu(), torch.tensor([[0.0, 1.5, -0.5, 0.0]]) / 4, rtol=1e-6, atol=0)


def _random(B, T, K, dtype, seed, *, packed=False, nan_masked=True):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, K, (B, T), generator=gen)
    if B > 1:
        ids[0, :] = -1  # a fully masked row
    lp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    old = lp + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    ref = lp + 0.5 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, T, generator=gen, dtype=torch.float64)
    if nan_masked:
        lp = torch.where(ids < 0, float("nan"), lp)
        adv = torch.where(ids < 0, float("inf"), adv)
    out = {"lp": lp.to(DEV, dtype), "old": old.to(DEV, dtype), "ref": ref.to(DEV, dtype), "adv": adv.to(DEV),
               "ids": ids.to(DEV), "cu": None}
    if packed:  # drop a random tail of each row and pack the rest
        lens = torch.randint(0, T + 1, (B,), generator=gen)
        keep = torch.arange(T).unsqueeze(0) < lens.unsqueeze(1)
        for k in ("lp", "old", "ref", "adv", "ids"):
            out[k] = out[k][keep.to(DEV)]
        out["cu"] = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(DEV)
    out["lp"].requires_grad_(True)
    return out


CONFIGS = [
    {},
    {"old": True, "clip_eps": 0.2},
    {"old": True, "clip_eps": (0.2, 0.28), "ref": True, "kl_coef": (0.25, 0.01)},
    {"ref": True, "kl_coef": 0.05},
]


def _matches_reference(x, backend, kw, *, grad_atol):
    """The op's loss, stats and gradient equal policy_loss_reference's on the same inputs; returns the gradient."""
    loss, stats = policy_loss(x["lp"], x["adv"], x["ids"], backend=backend, **kw)
    want, wstats = policy_loss_reference(x["lp"], x["adv"], x["ids"], **kw)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    for k, v in wstats.items():
        torch.testing.assert_close(stats[k], v, rtol=1e-5, atol=1e-6, msg=k)
    (g,) = torch.autograd.grad(loss, x["lp"])
    (wg,) = torch.autograd.grad(want, x["lp"])
    torch.testing.assert_close(g, wg, rtol=1e-5, atol=grad_atol)
    return g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
@pytest.mark.parametrize("packed", [False, True])
def test_random_vs_reference(backend, cfg, agg, estimator, packed):
    c = CONFIGS[cfg]
    if estimator != "k3" and not c.get("ref"):
        pytest.skip("estimator only matters with a reference")
    x = _random(9, 37, 2, torch.float32, seed=cfg * 7 + len(agg), packed=packed)
    kw = {"old_logprobs": x["old"] if c.get("old") else None, "ref_logprobs": x["ref"] if c.get("ref") else None,
              "kl_coef": c.get("kl_coef", 0.0), "kl_estimator": estimator, "clip_eps": c.get("clip_eps"), "agg": agg,
              "cu_seqlens": x["cu"]}
    g = _matches_reference(x, backend, kw, grad_atol=1e-7)
    mask = x["ids"] < 0
    assert (g[mask] == 0).all() and torch.isfinite(g).all()  # exactly zero, NaN inputs there


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_vs_float64(backend, dtype):
    x = _random(5, 64, 2, dtype, seed=11)
    kw = {"old_logprobs": x["old"], "ref_logprobs": x["ref"], "kl_coef": (0.1, 0.01), "clip_eps": 0.2}
    loss, _ = policy_loss(x["lp"], x["adv"], x["ids"], backend=backend, **kw)
    lp64 = x["lp"].detach().double().requires_grad_(True)
    want, _ = policy_loss_reference(lp64, x["adv"], x["ids"], old_logprobs=x["old"].double(),
                                    ref_logprobs=x["ref"].double(), kl_coef=(0.1, 0.01), clip_eps=0.2)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(loss, x["lp"])
    (wg,) = torch.autograd.grad(want, lp64)
    assert g.dtype == dtype
    torch.testing.assert_close(g.double(), wg, rtol=2e-2 if dtype == torch.bfloat16 else 2e-3, atol=1e-6)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("torch", "cpu")])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("packed", [False, True])
def test_gradcheck_float64(backend, agg, packed):
    x = _random(4, 6, 2, torch.float64, seed=5, packed=packed, nan_masked=False)
    # token_kl_reference rounds KL values to float32, so the torch backend's loss is checked by
    # finite differences without the KL term; the cpu ext computes KL in float64
    ref = x["ref"] if backend == "cpu" else None
    for est in (["k1", "k2", "k3"] if backend == "cpu" else ["k3"]):
        def f(lp, est=est):
            return policy_loss(lp, x["adv"], x["ids"], old_logprobs=x["old"], ref_logprobs=ref,
                               kl_coef=(0.3, 0.07) if ref is not None else 0.0, kl_estimator=est, clip_eps=0.2,
                               agg=agg, cu_seqlens=x["cu"],
                               backend=backend)[0]
        assert torch.autograd.gradcheck(f, (x["lp"],), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_gradient_exactly_zero_with_nan_grad(backend):
    x = _random(6, 20, 2, torch.float32, seed=2)
    loss, _ = policy_loss(x["lp"], x["adv"], x["ids"], ref_logprobs=x["ref"], kl_coef=0.1, backend=backend)
    (g,) = torch.autograd.grad(loss, x["lp"], torch.tensor(float("inf")))
    assert (g[x["ids"] < 0] == 0).all()


def test_default_old_is_reinforce_gradient():
    x = _random(3, 10, 2, torch.float32, seed=1, nan_masked=False)
    loss, _ = policy_loss(x["lp"], x["adv"], x["ids"])
    (g,) = torch.autograd.grad(loss, x["lp"])
    n = (x["ids"] >= 0).sum()
    torch.testing.assert_close(g, torch.where(x["ids"] >= 0, -x["adv"].float() / n, torch.zeros_like(g)))


def test_more_turns_and_num_turns():
    x = _random(4, 16, 3, torch.float32, seed=9)
    loss, stats = policy_loss(x["lp"], x["adv"], x["ids"], ref_logprobs=x["ref"], kl_coef=0.1, num_turns=3)
    want, wstats = policy_loss_reference(x["lp"], x["adv"], x["ids"], ref_logprobs=x["ref"], kl_coef=0.1,
                                         num_turns=3)
    torch.testing.assert_close(loss, want)
    assert "kl_turn2" in stats and set(stats) == set(wstats)


def test_compile_fullgraph():
    x = _random(4, 12, 2, torch.float32, seed=4, nan_masked=False)
    vals = torch.randn(4, 2)

    def f(lp, vals, ids, ref):
        adv = token_advantages(vals, ids)
        loss, stats = policy_loss(lp, adv, ids, ref_logprobs=ref, kl_coef=(0.1, 0.01), clip_eps=0.2,
                                  agg="seq-mean-token-mean")
        return loss * 2 + stats["kl_turn0"]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x["lp"], vals, x["ids"], x["ref"])
    (g,) = torch.autograd.grad(out, x["lp"])
    want = f(x["lp"], vals, x["ids"], x["ref"])
    (wg,) = torch.autograd.grad(want, x["lp"])
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(g, wg)


def test_opcheck():
    x = _random(3, 8, 2, torch.float32, seed=8, nan_masked=False)
    for backend in BACKENDS:
        torch.library.opcheck(torch.ops.score.policy_loss.default,
                              (x["lp"], x["adv"], x["ids"], x["old"], x["ref"], None, None, [0.1, 0.01], 2, 0.2,
                               0.2, 2, 0.0, backend))


@pytest.mark.parametrize("bad,match", [
    (lambda x: policy_loss(x["lp"], x["adv"][:, :-1], x["ids"]), "advantages"),
    (lambda x: policy_loss(x["lp"], x["adv"], x["ids"][:-1]), "turn_ids"),
    (lambda x: policy_loss(x["lp"], x["adv"], x["ids"], old_logprobs=x["old"][:-1]), "old_logprobs"),
    (lambda x: policy_loss(x["lp"], x["adv"], x["ids"], ref_logprobs=x["ref"][:, :3]), "ref_logprobs"),
    (lambda x: policy_loss(x["lp"], x["adv"], x["ids"].float()), "turn_ids"),
    (lambda x: policy_loss(x["lp"], x["adv"], x["ids"] + 1), "turn_ids"),  # turn id 2 >= K=2
    (lambda x: policy_loss(x["lp"], x["adv"], x["ids"], kl_coef=(0.0,)), "turn_ids"),  # K=1
    (lambda x: policy_loss(x["lp"], x["adv"], x["ids"], kl_coef=0.1), "kl_coef"),  # no ref: no KL applied
    (lambda x: policy_loss(x["lp"], x["adv"], x["ids"], global_token_count=torch.tensor(0.0)), "global_token_count"),
    (lambda x: policy_loss(x["lp"], x["adv"], x["ids"], kl_coef="big"), "kl_coef"),
    (lambda x: policy_loss(x["lp"], x["adv"], x["ids"], kl_coef=(0.1, 0.2), num_turns=3), "kl_coef"),
    (lambda x: policy_loss(x["lp"], x["adv"], x["ids"], kl_estimator="k9"), "kl_estimator"),
    (lambda x: policy_loss(x["lp"], x["adv"], x["ids"], agg="sum"), "agg"),
    (lambda x: policy_loss(x["lp"], x["adv"], x["ids"], clip_eps=-0.1), "clip_eps"),
    (lambda x: policy_loss(x["lp"], x["adv"], x["ids"], global_token_count=0), "global_token_count"),
    (lambda x: policy_loss(x["lp"], x["adv"], x["ids"], global_token_count=torch.ones(2)), "global_token_count"),
    (lambda x: policy_loss(x["lp"].reshape(-1), x["adv"].reshape(-1), x["ids"].reshape(-1)), "logprobs"),
    (lambda x: policy_loss(x["lp"].reshape(-1), x["adv"].reshape(-1), x["ids"].reshape(-1),
                           cu_seqlens=torch.tensor([0, 5])), "cu_seqlens"),
    (lambda x: policy_loss(x["lp"], x["adv"], x["ids"], backend="nope"), "backend"),
])
def test_bad_input_raises_value_error(bad, match):
    gen = torch.Generator().manual_seed(0)
    x = {"lp": torch.randn(3, 8, generator=gen), "adv": torch.randn(3, 8, generator=gen),
             "ids": torch.randint(-1, 2, (3, 8), generator=gen), "old": torch.randn(3, 8, generator=gen),
             "ref": torch.randn(3, 8, generator=gen)}
    x["ids"][0, 0] = 1
    with pytest.raises(ValueError, match=match):
        bad(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_benchmark_shape_matches_chained_reference(backend):
    """At the paired benchmark's shape (benchmarks/test_bench_rl.py::test_policy_loss times these two paths),
    the op's loss, stats and gradient equal the chained reference's: rows long enough to split the kernels'
    reductions, which the small random cases do not."""
    from benchmarks.shapes import shape

    s = shape("cpu", "policy_loss")
    x = _random(s["B"], s["T"], s["K"], torch.float32, seed=0, nan_masked=False)
    kw = {"old_logprobs": x["old"], "ref_logprobs": x["ref"], "kl_coef": (0.1, 0.01), "clip_eps": 0.2}
    _matches_reference(x, backend, kw, grad_atol=1e-9)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("packed", [False, True])
def test_gpu_cuda_matches_torch_backend(dtype, packed):
    if "cuda" not in live_backends("cuda"):
        pytest.skip("cuda ext not live")
    for agg in AGGS:
        x = _random(64, 1000, 2, dtype, seed=3, packed=packed)
        kw = {"old_logprobs": x["old"], "ref_logprobs": x["ref"], "kl_coef": (0.25, 0.01), "clip_eps": (0.2, 0.28),
                  "agg": agg, "cu_seqlens": x["cu"]}
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss, stats = policy_loss(x["lp"], x["adv"], x["ids"], backend="cuda", **kw)
            (g,) = torch.autograd.grad(loss, x["lp"])
        finally:
            torch.cuda.set_sync_debug_mode(0)
        want, wstats = policy_loss(x["lp"], x["adv"], x["ids"], backend="torch", **kw)
        (wg,) = torch.autograd.grad(want, x["lp"])
        tol = {"rtol": 1e-5, "atol": 1e-6} if dtype != torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-6}
        torch.testing.assert_close(loss, want, **tol)
        for k, v in wstats.items():
            torch.testing.assert_close(stats[k], v, rtol=1e-4, atol=1e-6, msg=k)
        gt = {"rtol": 1e-5, "atol": 1e-8} if dtype != torch.bfloat16 else {"rtol": 1.6e-2, "atol": 1e-8}
        torch.testing.assert_close(g, wg, **gt)
        assert (g[x["ids"] < 0] == 0).all()


@pytest.mark.gpu
def test_gpu_large_one_row_and_many_turns():
    if "cuda" not in live_backends("cuda"):
        pytest.skip("cuda ext not live")
    for B, T, K in ((1, 1 << 20, 2), (333, 777, 5)):
        x = _random(B, T, K, torch.float32, seed=B)
        kw = {"ref_logprobs": x["ref"], "kl_coef": [0.1] * K, "agg": "seq-mean-token-mean"}
        loss, stats = policy_loss(x["lp"], x["adv"], x["ids"], backend="cuda", **kw)
        want, wstats = policy_loss(x["lp"], x["adv"], x["ids"], backend="torch", **kw)
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats[f"kl_turn{K - 1}"], wstats[f"kl_turn{K - 1}"], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- kl_tokens
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("gc", [None, 50])
def test_kl_tokens_vs_float64_reference(backend, agg, packed, gc):
    x = _random(7, 23, 2, torch.float32, seed=13 + len(agg), packed=packed)
    gen = torch.Generator().manual_seed(3)
    kl = torch.rand(x["lp"].shape, generator=gen).to(DEV)
    kl = torch.where(x["ids"] < 0, float("nan"), kl).requires_grad_(True)  # NaN where masked must not leak
    kw = {"old_logprobs": x["old"], "clip_eps": 0.2, "kl_coef": (0.3, 0.05), "agg": agg, "cu_seqlens": x["cu"],
          "global_token_count": gc}
    loss, stats = policy_loss(x["lp"], x["adv"], x["ids"], kl_tokens=kl, backend=backend, **kw)
    lp64 = x["lp"].detach().double().requires_grad_(True)
    kl64 = kl.detach().double().requires_grad_(True)
    want, wstats = policy_loss_reference(lp64, x["adv"], x["ids"], kl_tokens=kl64,
                                         **{**kw, "old_logprobs": x["old"].double()})
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    assert set(stats) == set(wstats)
    for k, v in wstats.items():
        torch.testing.assert_close(stats[k], v, rtol=1e-5, atol=1e-6, msg=k)
    g_lp, g_kl = torch.autograd.grad(loss, (x["lp"], kl))
    w_lp, w_kl = torch.autograd.grad(want, (lp64, kl64))
    torch.testing.assert_close(g_lp.double(), w_lp, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_kl.double(), w_kl, rtol=1e-5, atol=1e-7)
    mask = x["ids"] < 0
    assert (g_kl[mask] == 0).all() and (g_lp[mask] == 0).all() and torch.isfinite(g_kl).all()


def test_kl_tokens_hand_computed_per_turn_stats():
    lp, _, ids = _hand()
    adv = torch.zeros(3, 4, device=DEV)
    kl = torch.tensor([[NAN, 0.5, 0.25, 1.0], [0.2, 0.4, NAN, NAN], [NAN] * 4], device=DEV, requires_grad=True)
    loss, stats = policy_loss(lp, adv, ids, kl_tokens=kl, kl_coef=(0.1, 0.01))
    # token-mean over 5 tokens: turn 0 tokens 0.5, 0.25, 0.2 (coef 0.1), turn 1 tokens 1.0, 0.4 (coef 0.01)
    want = (0.1 * (0.5 + 0.25 + 0.2) + 0.01 * (1.0 + 0.4)) / 5
    assert math.isclose(float(loss), want, rel_tol=1e-6) and math.isclose(float(stats["kl_loss"]), want, rel_tol=1e-6)
    assert math.isclose(float(stats["kl_turn0"]), 0.95 / 3, rel_tol=1e-6)
    assert math.isclose(float(stats["kl_turn1"]), 0.7, rel_tol=1e-6)
    assert math.isclose(float(stats["kl_mean"]), 2.35 / 5, rel_tol=1e-6)
    (g,) = torch.autograd.grad(loss, kl)
    coef = torch.tensor([[0, 0.1, 0.1, 0.01], [0.1, 0.01, 0, 0], [0] * 4], dtype=torch.float32) / 5
    torch.testing.assert_close(g.cpu(), coef, rtol=1e-6, atol=0)


def test_kl_tokens_gradcheck_float64():
    x = _random(4, 6, 2, torch.float64, seed=5, nan_masked=False)
    kl = torch.rand(4, 6, dtype=torch.float64, requires_grad=True)

    def f(lp, kl):
        return policy_loss(lp, x["adv"], x["ids"], old_logprobs=x["old"], kl_tokens=kl, kl_coef=(0.3, 0.07),
                           agg="seq-mean-token-mean", backend="torch")[0]
    assert torch.autograd.gradcheck(f, (x["lp"], kl), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_kl_tokens_bad_input():
    lp, adv, ids = _hand()
    with pytest.raises(ValueError, match="kl_tokens"):
        policy_loss(lp, adv, ids, kl_tokens=torch.zeros(3, 4), ref_logprobs=lp.detach(), kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_tokens"):
        policy_loss(lp, adv, ids, kl_tokens=torch.zeros(3, 3), kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_tokens"):
        policy_loss(lp, adv, ids, kl_tokens=torch.zeros(3, 4, dtype=torch.long), kl_coef=0.1)


# ----------------------------------------------------------------------------- bad numbers stay visible
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", [{}, {"clip_eps": 0.2}, {"old": True}, {"kl_tokens": True}])
@pytest.mark.parametrize("bad", [NAN, float("inf"), -float("inf")])
def test_nan_logprob_gives_nan_loss_and_gradient(backend, cfg, bad):
    """A NaN / inf log-prob at a policy token is NaN out on every backend, as in the reference (no
    old_logprobs: ratio = exp(lp - lp) is NaN there, not 1)."""
    lp = torch.tensor([[bad, -1.0, -2.0], [-0.5, -0.1, -0.3]], device=DEV, requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.5, 0.5]], device=DEV)
    ids = torch.tensor([[0, 0, 1], [0, 1, -1]], device=DEV)
    kw = {"clip_eps": cfg.get("clip_eps")}
    if cfg.get("old"):
        kw["old_logprobs"] = torch.full((2, 3), -1.0, device=DEV)
    if cfg.get("kl_tokens"):
        kw.update(kl_tokens=torch.full((2, 3), 0.1, device=DEV), kl_coef=0.1)
    loss, _ = policy_loss(lp, adv, ids, backend=backend, **kw)
    want, _ = policy_loss_reference(lp, adv, ids, **kw)
    (g,) = torch.autograd.grad(loss, lp)
    (wg,) = torch.autograd.grad(want, lp)
    def same(a, b):  # the same NaN and inf positions
        return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.isinf(a), torch.isinf(b))

    assert same(loss, want) and same(g.cpu(), wg.cpu()), (float(loss), float(want), g, wg)
    if "old_logprobs" not in kw:  # issue 16: this case gave a finite loss and gradient on a backend
        assert torch.isnan(loss) and torch.isnan(g[0, 0])
    assert g[1, 2] == 0  # a masked token stays exactly 0


def test_nan_kl_tokens_at_a_policy_token_is_nan():
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    kl = torch.tensor([[NAN, 0.1]], requires_grad=True)
    loss, stats = policy_loss(lp, torch.ones(1, 2), torch.zeros(1, 2, dtype=torch.long), kl_tokens=kl, kl_coef=0.1)
    assert torch.isnan(loss) and torch.isnan(stats["kl_turn0"])
