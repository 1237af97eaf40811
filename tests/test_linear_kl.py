"""linear_kl (exact full-vocabulary KL from hidden states) against a float64 reference."""
import pytest
import torch

from score_kernels import _vocab_tiles as VT  # the budgets the chunked paths read
from score_kernels import linear_kl, linear_kl_reference
from tests.helpers import INTERPRET, device

DEV = device()
TRITON = INTERPRET or torch.cuda.is_available()


def _case(lead, d, V, dtype, bias, rd=None, seed=0, masked=True):
    g = torch.Generator().manual_seed(seed)
    rd = rd or d
    h = torch.randn(*lead, d, generator=g, dtype=torch.float64)
    w = torch.randn(V, d, generator=g, dtype=torch.float64) * (1.5 / d ** 0.5)
    rh = torch.randn(*lead, rd, generator=g, dtype=torch.float64)
    rw = torch.randn(V, rd, generator=g, dtype=torch.float64) * (1.5 / rd ** 0.5)
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.3 if bias else None
    rb = torch.randn(V, generator=g, dtype=torch.float64) * 0.3 if bias else None
    mask = torch.rand(lead, generator=g) > 0.3 if masked else None
    up = torch.randn(lead, generator=g, dtype=torch.float64)
    cast = lambda x: x.to(DEV, dtype) if x is not None else None
    return [cast(x) for x in (h, w, b, rh, rw, rb)], (mask.to(DEV) if mask is not None else None), up.to(DEV)


def _run(fn, xs, mask, T, up, **kw):
    h, w, b, rh, rw, rb = xs
    leaves = [x.detach().clone().requires_grad_(True) if x is not None else None for x in (h, w, b)]
    kl = fn(leaves[0], leaves[1], rh, rw, bias=leaves[2], ref_bias=rb, temperature=T, mask=mask, **kw)
    grads = torch.autograd.grad((kl.double() * up).sum(), [x for x in leaves if x is not None])
    return kl.detach(), grads


def check(backend, lead, d, V, dtype, T, bias, rd=None, masked=True):
    xs, mask, up = _case(lead, d, V, dtype, bias, rd, masked=masked)
    kl, grads = _run(linear_kl, xs, mask, T, up, backend=backend)
    assert kl.shape == lead and kl.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    x64 = [x.double() if x is not None else None for x in xs]
    r_kl, r_grads = _run(linear_kl_reference, x64, mask, T, up)
    if mask is not None:
        assert (kl[~mask] == 0).all() and (grads[0][~mask] == 0).all()
    assert (kl >= -1e-5).all()
    # statistics accumulate in fp32 from exactly-represented inputs; gradients round once to dtype
    at = 1e-10 if dtype == torch.float64 else 5e-5
    gt = {torch.float64: 1e-10, torch.float32: 5e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    if dtype in (torch.bfloat16, torch.float16) and backend == "triton":
        at = 2e-2  # tensor-core dots on low-precision operands (and the interpreter's upcast) differ little
    torch.testing.assert_close(kl.double(), r_kl, rtol=at, atol=at * max(1.0, r_kl.abs().max().item()))
    for a, r in zip(grads, r_grads):
        torch.testing.assert_close(a.double(), r, rtol=gt, atol=gt * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("T,bias", [(1.0, False), (0.7, True)])
@pytest.mark.parametrize("shape", [((1,), 16, 1), ((7,), 72, 33), ((130,), 16, 1000), ((2, 5), 16, 4099)])
def test_torch(shape, T, bias, dtype):
    check("torch", *shape, dtype, T, bias)


def test_torch_chunks_and_ref_width(monkeypatch):
    monkeypatch.setattr(VT, "WORK_BYTES", 4 * 1000 * 9)
    check("torch", (130,), 16, 1000, torch.float32, 0.7, True, rd=24)
    check("torch", (7,), 16, 33, torch.float64, 1.0, False, rd=8, masked=False)


# Cached rows take dz = g u / T from the forward; the rest recompute both GEMMs. No cache, a cache
# boundary inside a chunk's range (chunks must stop at it), and everything cached must all agree.
@pytest.mark.parametrize("cache_rows", [0, 37, 10_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_cache_boundary(monkeypatch, cache_rows, dtype):
    V = 1000
    monkeypatch.setattr(VT, "CACHE_BYTES", cache_rows * V * 4)
    monkeypatch.setattr(VT, "WORK_BYTES", 4 * V * 20)
    check("torch", (130,), 16, V, dtype, 0.7, True, rd=24)
    check("torch", (2, 45), 16, V, dtype, 1.0, False, masked=False)


def test_torch_no_cache_without_grad():
    import score_kernels.linear_kl  # noqa: F401
    op = torch.ops.score.linear_kl.default
    xs, mask, _ = _case((9,), 16, 33, torch.float32, False)
    h, w, b, rh, rw, rb = xs
    assert op(h, w, b, rh, rw, rb, mask, 1.0, "torch", False)[3].shape[0] == 0
    assert op(h, w, b, rh, rw, rb, mask, 1.0, "torch", True)[3].shape[0] == int(mask.sum())


@pytest.mark.skipif(not TRITON, reason="needs triton")
@pytest.mark.parametrize("case", [((1,), 16, 1, torch.float32, 1.0, False), ((7,), 72, 33, torch.bfloat16, 0.7, True),
                                  ((130,), 16, 1000, torch.float32, 0.7, True),
                                  ((2, 5), 16, 4099, torch.float16, 1.0, False)])
def test_triton(case):
    check("triton", *case)


@pytest.mark.skipif(not TRITON, reason="needs triton")
def test_triton_ref_width_and_slices(monkeypatch):
    monkeypatch.setattr(VT, "GPU_DZ_BYTES", 130 * 4 * 256)
    check("triton", (130,), 16, 1000, torch.float32, 1.0, True, rd=40)


def test_identical_models_zero_kl():
    xs, _, _ = _case((9,), 16, 33, torch.float32, True)
    h, w, b = xs[:3]
    kl = linear_kl(h, w, h, w, bias=b, ref_bias=b)
    assert kl.abs().max() < 1e-5


def test_no_grad_to_reference_and_all_masked():
    xs, _, _ = _case((5,), 16, 33, torch.float32, False)
    h, w, _, rh, rw, _ = (x.requires_grad_() if x is not None else None for x in xs)
    kl = linear_kl(h, w, rh, rw)
    kl.sum().backward()
    assert rh.grad is None and rw.grad is None and h.grad is not None
    h.grad = w.grad = None
    kl = linear_kl(h, w, rh, rw, mask=torch.zeros(5, dtype=torch.bool))
    kl.sum().backward()
    assert (kl == 0).all() and (h.grad == 0).all() and (w.grad == 0).all()


def test_compile():
    xs, mask, _ = _case((2, 4), 16, 33, torch.float32, True)
    h, w, b, rh, rw, rb = xs
    h.requires_grad_()

    def f(h):
        return linear_kl(h, w, rh, rw, bias=b, ref_bias=rb, temperature=0.7, mask=mask, backend="torch").sum()

    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(h)
    (g,) = torch.autograd.grad(loss, h)
    h2 = h.detach().clone().requires_grad_()
    want = f(h2)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(g, torch.autograd.grad(want, h2)[0])


@pytest.mark.parametrize("bad", ["ref_hidden", "ref_weight", "mask", "mask_dtype", "ref_bias"])
def test_bad_input(bad):
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    rh, rw, kw = torch.randn(4, 8), torch.randn(10, 8), {}
    if bad == "ref_hidden":
        rh = torch.randn(5, 8)
    elif bad == "ref_weight":
        rw = torch.randn(11, 8)
    elif bad == "mask":
        kw["mask"] = torch.ones(5, dtype=torch.bool)
    elif bad == "mask_dtype":
        kw["mask"], bad = torch.ones(4), "mask"
    else:
        kw["ref_bias"] = torch.randn(3)
    with pytest.raises(ValueError, match=bad):
        linear_kl(h, w, rh, rw, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu(dtype):
    check("triton", (1000,), 256, 32000, dtype, 0.7, True)
    check("triton", (3, 77), 576, 49152, dtype, 1.0, False)
