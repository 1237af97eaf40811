"""logprobs_from_logits against a float64 reference (values and dlogits), torch and Triton paths."""
import pytest
import torch

from score_kernels import _vocab_tiles as VT  # the budgets the chunked paths read
from score_kernels import logprobs_from_logits, logprobs_from_logits_reference
from tests.helpers import INTERPRET, device

DEV = device()
TRITON = INTERPRET or torch.cuda.is_available()


def _case(lead, V, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, V, generator=g, dtype=torch.float64) * scale).to(DEV, dtype)
    t = torch.randint(0, V, lead, generator=g)
    if t.numel() > 2:
        t.view(-1)[1] = -100
    ups = [torch.randn(lead, generator=g, dtype=torch.float64).to(DEV) for _ in range(2)]
    return x, t.to(DEV), ups


def _run(fn, x, t, T, ent, ups, **kw):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, t, temperature=T, return_entropy=ent, **kw)
    outs = out if ent else (out,)
    (g,) = torch.autograd.grad(sum((o.double() * u).sum() for o, u in zip(outs, ups)), x)
    return [o.detach() for o in outs], g


def check(backend, lead, V, dtype, T, ent):
    x, t, ups = _case(lead, V, dtype)
    outs, g = _run(logprobs_from_logits, x, t, T, ent, ups, backend=backend)
    r_outs, r_g = _run(logprobs_from_logits_reference, x.double(), t, T, ent, ups)
    assert g.dtype == x.dtype
    assert (g[t == -100] == 0).all()
    for o in outs:
        assert o.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    at = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}[dtype]
    for a, r in zip(outs, r_outs):  # statistics are fp32 from the (exact) low-precision inputs
        torch.testing.assert_close(a.double(), r, rtol=at, atol=at * max(1.0, r.abs().max().item()))
    # dlogits is rounded to the input dtype once
    gt = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(g.double(), r_g, rtol=gt, atol=gt * max(1.0, r_g.abs().max().item()))


OPTS = [(1.0, False), (0.7, True)]
SHAPES = [((1,), 1), ((7,), 33), ((130,), 1000), ((7,), 4099), ((2, 5), 33)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("opts", OPTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_torch(shape, opts, dtype):
    check("torch", *shape, dtype, *opts)


def test_torch_many_chunks(monkeypatch):
    monkeypatch.setattr(VT, "WORK_BYTES", 4 * 1000 * 2 * 9)
    check("torch", (130,), 1000, torch.float32, 0.7, True)


@pytest.mark.skipif(not TRITON, reason="needs triton")
@pytest.mark.parametrize("case", [((1,), 1, torch.float32, 1.0, False), ((7,), 4099, torch.bfloat16, 0.7, True),
                                  ((130,), 1000, torch.float16, 1.0, True), ((2, 5), 33, torch.float32, 0.7, True)])
def test_triton(case):
    check("triton", *case)


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if TRITON else []))
def test_extreme_logits(backend):
    x = torch.tensor([[1e4, -1e4, 0.0, 1e4 - 1], [-1e4, -1e4, -1e4, -1e4], [float("-inf"), 0.0, 1.0, 2.0]],
                     device=DEV).requires_grad_()
    t = torch.tensor([3, 0, 2], device=DEV)
    lp, ent = logprobs_from_logits(x, t, return_entropy=True, backend=backend)
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(x.grad).all()
    r_lp, r_ent = logprobs_from_logits_reference(x.detach().double(), t, return_entropy=True)
    torch.testing.assert_close(lp.double(), r_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), r_ent, rtol=0, atol=1e-5)


def test_all_ignored_and_bad_input():
    x = torch.randn(3, 5, requires_grad=True)
    t = torch.full((3,), -100)
    lp = logprobs_from_logits(x, t)
    lp.sum().backward()
    assert (lp == 0).all() and (x.grad == 0).all()
    with pytest.raises(ValueError, match="targets"):
        logprobs_from_logits(x, torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="targets"):
        logprobs_from_logits(x, torch.zeros(3))
    with pytest.raises(ValueError, match="targets"):
        logprobs_from_logits(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="logits"):
        logprobs_from_logits(torch.zeros(3, 5, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(x, torch.zeros(3, dtype=torch.long), temperature=-1.0)


def test_compile():
    x = torch.randn(2, 4, 33, requires_grad=True)
    t = torch.randint(0, 33, (2, 4))

    def f(x, t):
        lp, ent = logprobs_from_logits(x, t, temperature=0.7, return_entropy=True, backend="torch")
        return lp.sum() + ent.sum()

    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(x, t)
    (g,) = torch.autograd.grad(loss, x)
    x2 = x.detach().clone().requires_grad_()
    want = f(x2, t)
    (g2,) = torch.autograd.grad(want, x2)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(g, g2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu(dtype):
    check("triton", (513,), 151936, dtype, 0.7, True)


@pytest.mark.gpu
def test_gpu_int64_offsets():
    N, V = 16384, 151936  # N * V > 2^31
    x = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, V, (N,), device="cuda")
    lp = logprobs_from_logits(x, t, backend="triton")
    r = logprobs_from_logits_reference(x[-4:].double(), t[-4:])
    torch.testing.assert_close(lp[-4:].double(), r, rtol=0, atol=1e-4)
