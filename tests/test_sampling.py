import pytest
import torch

from score_kernels import sample
from score_kernels.sampling import uniforms
from tests.helpers import device

DEV = device()


def params(b, temperature=1.0, top_p=None, top_k=None, seed0=0, pos0=0):
    t = torch.full((b,), float(temperature), device=DEV)
    tp = None if top_p is None else torch.full((b,), float(top_p), device=DEV)
    tk = None if top_k is None else torch.full((b,), int(top_k), device=DEV, dtype=torch.long)
    return dict(temperature=t, top_p=tp, top_k=tk, seeds=torch.arange(seed0, seed0 + b, device=DEV),
                positions=torch.full((b,), pos0, device=DEV, dtype=torch.long))


def logits_(b, v, seed=0, scale=3.0):
    return (torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * scale).to(DEV)


def test_greedy_is_argmax_with_plain_logprob():
    x = logits_(6, 1000)
    tok, lp = sample(x, **params(6, temperature=0.0, top_k=5, top_p=0.5))
    assert tok.dtype == torch.int64 and lp.dtype == torch.float32
    assert torch.equal(tok, x.argmax(-1))
    torch.testing.assert_close(lp, torch.log_softmax(x, -1).gather(1, tok[:, None])[:, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logprob_is_untruncated_temperature_scaled(dtype):
    x = logits_(16, 500).to(dtype)
    p = params(16, temperature=0.7, top_p=0.8, top_k=20)
    tok, lp = sample(x, **p)
    want = torch.log_softmax(x.float() / 0.7, -1).gather(1, tok[:, None])[:, 0]
    torch.testing.assert_close(lp, want, rtol=1e-5, atol=1e-5)


def test_batch_invariance():
    # mixed per-row settings; each row alone, in the batch, and in a permuted batch gives the same draw
    b, v = 9, 3000
    x = logits_(b, v, scale=1.0)
    t = torch.tensor([1.0, 0.0, 0.5, 1.3, 1.0, 0.8, 1.0, 2.0, 0.9], device=DEV)
    tp = torch.tensor([1.0, 1.0, 0.9, 0.5, 1.0, 0.95, 0.3, 1.0, 0.99], device=DEV)
    tk = torch.tensor([0, 0, 0, 0, 50, 10, 0, 3, 7], device=DEV)
    seeds = torch.tensor([7, 7, 123, 2**40 + 5, -3, 0, 9, 11, 7], device=DEV)
    pos = torch.tensor([0, 1, 5, 100, 2**33, 7, 7, 8, 9], device=DEV)
    tok, lp = sample(x, temperature=t, top_p=tp, top_k=tk, seeds=seeds, positions=pos)
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(1)).to(DEV)
    tok_p, lp_p = sample(x[perm], temperature=t[perm], top_p=tp[perm], top_k=tk[perm], seeds=seeds[perm],
                         positions=pos[perm])
    assert torch.equal(tok_p, tok[perm]) and torch.equal(lp_p, lp[perm])
    for i in range(b):
        s = slice(i, i + 1)
        ti, li = sample(x[s], temperature=t[s], top_p=tp[s], top_k=tk[s], seeds=seeds[s], positions=pos[s])
        assert ti.item() == tok[i].item() and li.item() == lp[i].item()
    # a row whose neighbours have no top-p/top-k gives the same draw as in the filtered batch
    ti, _ = sample(torch.cat([x[3:4], x[:1]]), temperature=t[[3, 0]], top_p=tp[[3, 0]], top_k=None,
                   seeds=seeds[[3, 0]], positions=pos[[3, 0]])
    assert ti[0].item() == tok[3].item()


def test_deterministic_and_depends_on_seed_and_position():
    x = logits_(1, 50000, scale=0.0).expand(64, -1).contiguous()  # uniform: draws vary a lot
    p = params(64)
    a, _ = sample(x, **p)
    b, _ = sample(x, **p)
    assert torch.equal(a, b)
    c, _ = sample(x, **params(64, pos0=1))
    assert (a != c).float().mean() > 0.9
    assert a.unique().numel() > 50  # different seeds give different draws


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.6), (12, 0.3)])
def test_filtered_tokens_never_drawn(top_k, top_p):
    v, n = 40, 1500
    x = logits_(1, v, scale=1.0).expand(n, -1).contiguous()
    tok, _ = sample(x, **params(n, top_k=top_k, top_p=top_p))
    order = x[0].argsort(descending=True)
    probs = torch.softmax(x[0], -1)[order]
    keep = v if top_k is None else top_k
    if top_p is not None:  # the nucleus: smallest prefix whose mass reaches top_p
        keep = min(keep, int((probs.cumsum(0) - probs < top_p).sum()))
    allowed = set(order[:keep].tolist())
    drawn = set(tok.tolist())
    assert drawn <= allowed
    assert len(drawn) == len(allowed)  # and every kept token does get drawn


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.6, None), (1.5, 6)])
def test_empirical_distribution_matches_softmax(temperature, top_k):
    v, n = 10, 12000
    x = logits_(1, v, seed=3, scale=1.0)
    tok, _ = sample(x.expand(n, -1).contiguous(), **params(n, temperature=temperature, top_k=top_k, seed0=10**6))
    scaled = x[0] / temperature
    if top_k is not None:
        scaled = scaled.masked_fill(scaled < scaled.topk(top_k).values[-1], float("-inf"))
    expected = torch.softmax(scaled.double(), -1) * n
    counts = torch.bincount(tok, minlength=v).double()
    keep = expected > 0
    assert counts[~keep].sum() == 0
    chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    assert chi2 < 35.0, chi2  # at most 9 dof: p < 1e-4 under the null


def test_uniforms_are_uniform_and_open_interval():
    u = uniforms(torch.arange(64, device=DEV), torch.zeros(64, dtype=torch.long, device=DEV), 4096)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 2e-3 and abs(u.var().item() - 1 / 12) < 2e-3
    hist = torch.histc(u.cpu(), bins=16, min=0, max=1)
    assert (hist - u.numel() / 16).abs().max() < 0.02 * u.numel() / 16 * 5


def test_bad_inputs_name_the_argument():
    x = logits_(3, 10)
    p = params(3)
    with pytest.raises(ValueError, match="temperature"):
        sample(x, **{**p, "temperature": p["temperature"][:2]})
    with pytest.raises(ValueError, match="seeds"):
        sample(x, **{**p, "seeds": p["seeds"].float()})
    with pytest.raises(ValueError, match="top_k"):
        sample(x, **{**p, "top_k": torch.ones(3, device=DEV)})
    with pytest.raises(ValueError, match="logits"):
        sample(x[0], **p)


@pytest.mark.gpu
def test_gpu_matches_cpu_and_is_batch_invariant():
    x = torch.randn(64, 32000, generator=torch.Generator().manual_seed(0)) * 2
    for top_p in (torch.full((64,), 0.95), None):  # batched torch path, fused triton path
        p_cpu = dict(temperature=torch.full((64,), 0.9), top_p=top_p, top_k=None,
                     seeds=torch.arange(64), positions=torch.arange(64))
        tok_c, lp_c = sample(x, **p_cpu)
        p_gpu = {k: (None if v is None else v.cuda()) for k, v in p_cpu.items()}
        tok_g, lp_g = sample(x.cuda(), **p_gpu)
        assert (tok_g.cpu() == tok_c).float().mean() >= 0.95  # log() may differ in the last bit across devices
        same = tok_g.cpu() == tok_c
        torch.testing.assert_close(lp_g.cpu()[same], lp_c[same], rtol=1e-4, atol=1e-4)
        tok_g2, _ = sample(x.cuda()[5:6], **{k: (None if v is None else v[5:6]) for k, v in p_gpu.items()})
        assert tok_g2.item() == tok_g[5].item()


def test_batched_path_agrees_with_row_path():
    # the batched path (used on GPUs) draws the same tokens as the CPU row path, up to float rounding
    from score_kernels.sampling import sample_reference
    b, v = 64, 2000
    x = logits_(b, v, seed=5, scale=2.0)
    t = torch.rand(b, generator=torch.Generator().manual_seed(2)) + 0.3
    t[:4] = 0.0
    tp = torch.where(torch.arange(b) % 3 == 0, torch.tensor(0.8), torch.tensor(1.0))
    tk = torch.where(torch.arange(b) % 4 == 1, torch.tensor(30), torch.tensor(0))
    args = (x, t, tp, tk, torch.arange(b) * 7919, torch.arange(b) + 3)
    tok_r, lp_r = sample_reference(*args)
    tok_b, lp_b = sample_reference(*args, _batched=True)
    assert (tok_r == tok_b).float().mean() >= 0.95
    same = tok_r == tok_b
    torch.testing.assert_close(lp_r[same], lp_b[same], rtol=1e-5, atol=1e-5)
    tok_n, _ = sample_reference(x, t, None, None, args[4], args[5], _batched=True)
    tok_m, _ = sample_reference(x, t, None, None, args[4], args[5])
    assert (tok_n == tok_m).float().mean() >= 0.95


def _triton_live():
    from score_kernels import backends
    return backends()["triton"]


@pytest.mark.skipif(not _triton_live(), reason="triton not live")
def test_triton_path_matches_torch_and_is_batch_invariant():
    from score_kernels.sampling import _sample_triton, sample_reference
    b, v = 8, 1000
    x = logits_(b, v, seed=9, scale=2.0)
    t = torch.tensor([0.0, 1.0, 0.7, 1.3, 1.0, 0.0, 0.5, 2.0], device=DEV)
    seeds, pos = torch.arange(b, device=DEV) * 31 + 5, torch.arange(b, device=DEV) + 100
    tok, lp = _sample_triton(x, t, seeds, pos)
    want_tok, want_lp = sample_reference(x, t, None, None, seeds, pos, _batched=True)
    assert torch.equal(tok[t == 0], x.argmax(-1)[t == 0])
    assert (tok == want_tok).float().mean() >= 0.85  # only near-ties may differ (log() implementations)
    same = tok == want_tok
    torch.testing.assert_close(lp[same], want_lp[same], rtol=1e-5, atol=1e-5)
    for i in (0, 3, 7):
        ti, li = _sample_triton(x[i:i + 1], t[i:i + 1], seeds[i:i + 1], pos[i:i + 1])
        assert ti.item() == tok[i].item() and li.item() == lp[i].item()
    bf = x.to(torch.bfloat16)
    tok_bf, lp_bf = _sample_triton(bf, t, seeds, pos)
    torch.testing.assert_close(lp_bf, torch.log_softmax(bf.float() / torch.where(t > 0, t, 1)[:, None], -1)
                               .gather(1, tok_bf[:, None])[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu  # thousands of programs: too slow for the interpreter, which the agreement test covers
def test_triton_path_empirical_distribution():
    from score_kernels.sampling import _sample_triton
    v, n = 10, 40000
    x = logits_(1, v, seed=3, scale=1.0)
    tok, _ = _sample_triton(x.expand(n, -1), torch.full((n,), 0.8, device=DEV),
                            torch.arange(n, device=DEV) + 77, torch.zeros(n, dtype=torch.long, device=DEV))
    expected = torch.softmax(x[0].double() / 0.8, -1) * n
    counts = torch.bincount(tok, minlength=v).double()
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 35.0, chi2
