"""linear_logprobs against a float64 reference: values and every gradient, both backends.

Triton runs under TRITON_INTERPRET=1 here (slow), so its cases are a small subset of the torch ones.
bf16/fp16 criterion: our error vs float64 (on the same rounded inputs) is at most 2x the error of a
plain PyTorch computation in that dtype, plus a small atol.
"""
import pytest
import torch

from score_kernels import _vocab_tiles as VT  # the budgets the chunked paths read
from score_kernels import linear_logprobs, linear_logprobs_reference
from tests.helpers import INTERPRET, device

DEV = device()
LOW = (torch.bfloat16, torch.float16)
TRITON = INTERPRET or torch.cuda.is_available()


def _impl(backend):
    """"triton-gemm" stands for backend="triton", impl="gemm" in parametrised tests."""
    return {"backend": "triton", "impl": "gemm"} if backend == "triton-gemm" else {"backend": backend}


def _inputs(lead, d, V, dtype, bias, seed=0, ignore=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, d, generator=g, dtype=torch.float64) * scale
    w = torch.randn(V, d, generator=g, dtype=torch.float64) * (1.5 / d ** 0.5)
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if bias else None
    t = torch.randint(0, V, lead, generator=g)
    if ignore and t.numel() > 2:
        t.view(-1)[1] = -100
        t.view(-1)[-1] = -100
    cast = [x.to(DEV, dtype) if x is not None else None for x in (h, w, b)]
    return cast, t.to(DEV)


def _run(fn, xs, t, T, ent, ups, **kw):
    leaves = [x.detach().clone().requires_grad_(True) if x is not None else None for x in xs]
    out = fn(leaves[0], leaves[1], t, leaves[2], temperature=T, return_entropy=ent, **kw)
    outs = out if ent else (out,)
    loss = sum((o.double() * u).sum() for o, u in zip(outs, ups))
    grads = torch.autograd.grad(loss, [x for x in leaves if x is not None])
    return [o.detach() for o in outs], list(grads)


def _plain(h, w, t, b, *, temperature, return_entropy, ignore_index=-100):
    """Plain PyTorch in the inputs' own dtype (what a trainer would write)."""
    z = h @ w.t()
    if b is not None:
        z = z + b
    lsm = torch.log_softmax(z / temperature, -1)
    valid = t != ignore_index
    lp = torch.where(valid, lsm.gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0)
    if not return_entropy:
        return lp
    return lp, torch.where(valid, -(lsm.exp() * lsm).sum(-1), 0)


def check(backend, lead, d, V, dtype, T, bias, ent, seed=0, impl=None):
    xs, t = _inputs(lead, d, V, dtype, bias, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    ups = [torch.randn(lead, generator=gen, dtype=torch.float64).to(DEV) for _ in range(2 if ent else 1)]
    outs, grads = _run(linear_logprobs, xs, t, T, ent, ups, backend=backend, impl=impl)
    for o in outs:
        assert o.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert o.shape == t.shape and torch.isfinite(o).all()
    x64 = [x.double() if x is not None else None for x in xs]
    r_outs, r_grads = _run(linear_logprobs_reference, x64, t, T, ent, ups)
    ign = t == -100
    for o in outs:
        assert (o[ign] == 0).all()
    assert (grads[0][ign] == 0).all(), "ignored tokens must get exactly zero gradient"
    for gr, x in zip(grads, xs):
        assert gr.dtype == x.dtype and gr.shape == x.shape
    if dtype in LOW:
        p_outs, p_grads = _run(_plain, xs, t, T, ent, ups)
        for name, a, r, p in zip(["lp", "ent"], outs, r_outs, p_outs):
            err, perr = (a.double() - r).abs().max().item(), (p.double() - r).abs().max().item()
            assert err <= 2 * perr + 2e-3, (name, err, perr)
        for name, a, r, p in zip(["dh", "dw", "db"], grads, r_grads, p_grads):
            scale = r.abs().max().item()
            err, perr = (a.double() - r).abs().max().item(), (p.double() - r).abs().max().item()
            assert err <= 2 * perr + 2e-3 * max(scale, 1.0), (name, err, perr, scale)
        return
    rt, at = (1e-10, 1e-10) if dtype == torch.float64 else (2e-5, 2e-5)
    for a, r in zip(outs, r_outs):
        torch.testing.assert_close(a.double(), r, rtol=rt, atol=at * max(1.0, r.abs().max().item()))
    for a, r in zip(grads, r_grads):
        torch.testing.assert_close(a.double(), r, rtol=rt, atol=at * max(1.0, r.abs().max().item()))


SHAPES = [((1,), 16, 1), ((7,), 72, 33), ((130,), 16, 1000), ((7,), 16, 4099), ((130,), 72, 4099),
          ((2, 5), 16, 33)]
OPTS = [(1.0, False, False), (0.7, True, True), (0.7, False, True), (1.0, True, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("opts", OPTS, ids=lambda o: f"T{o[0]}-bias{int(o[1])}-ent{int(o[2])}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}")
def test_torch_matches_float64(shape, opts, dtype):
    check("torch", *shape, dtype, *opts)


@pytest.mark.parametrize("cache_mb,work_mb", [(0, 0.05), (0.2, 0.1), (2.0, 0.02)])
@pytest.mark.parametrize("ent", [False, True])
def test_torch_chunking_and_cache(monkeypatch, cache_mb, work_mb, ent):
    """Many chunks, vocab slices, and the forward->backward logits cache fully/partly/not used."""
    monkeypatch.setattr(VT, "CACHE_BYTES", int(cache_mb * 2**20))
    monkeypatch.setattr(VT, "WORK_BYTES", int(work_mb * 2**20))
    check("torch", (130,), 72, 1000, torch.float32, 0.7, True, ent)
    check("torch", (130,), 16, 1000, torch.float64, 1.0, False, ent)


TRITON_CASES = [
    ((1,), 16, 1, torch.float32, 1.0, False, False),
    ((7,), 72, 33, torch.bfloat16, 0.7, True, True),
    ((130,), 16, 1000, torch.float32, 0.7, True, True),
    ((7,), 16, 4099, torch.float16, 1.0, False, True),
    ((130,), 72, 4099, torch.bfloat16, 1.0, True, False),
    ((2, 5), 16, 33, torch.float32, 1.0, True, True),
    ((130,), 72, 1000, torch.float16, 0.7, False, False),
]


@pytest.mark.skipif(not TRITON, reason="needs triton (GPU or interpreter)")
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{str(c[3])[6:]}-T{c[4]}")
def test_triton_matches_float64(case):
    check("triton", *case)


@pytest.mark.skipif(not TRITON, reason="needs triton (GPU or interpreter)")
def test_triton_vocab_slices_and_splits(monkeypatch):
    # several backward vocab slices (dweight per slice, dhidden accumulated across them)
    monkeypatch.setattr(VT, "GPU_DZ_BYTES", 7 * 4 * 128)
    check("triton", (7,), 16, 1000, torch.float32, 0.7, True, True)


@pytest.mark.skipif(not TRITON, reason="needs triton (GPU or interpreter)")
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{str(c[3])[6:]}-T{c[4]}")
def test_triton_gemm_matches_float64(case):
    """impl="gemm": torch.mm GEMMs per vocab chunk (cuBLAS on a GPU) with the Triton epilogues."""
    check("triton", *case, impl="gemm")


@pytest.mark.skipif(not TRITON, reason="needs triton (GPU or interpreter)")
@pytest.mark.parametrize("ent", [False, True])
def test_triton_gemm_many_chunks(monkeypatch, ent):
    # 128-column chunks: the running statistics merge across chunks, dweight is written per chunk
    # and dhidden accumulates across them; the last chunk is partial (1000 = 7 * 128 + 104)
    monkeypatch.setattr(VT, "GPU_CHUNK_BYTES", 7 * 4 * 128)
    check("triton", (7,), 16, 1000, torch.float32, 0.7, True, ent, impl="gemm")
    check("triton", (7,), 72, 1000, torch.bfloat16, 1.0, False, ent, impl="gemm")


@pytest.mark.skipif(not TRITON, reason="needs triton (GPU or interpreter)")
@pytest.mark.parametrize("cached", [3, 99], ids=["3-of-8-chunks", "all-chunks"])
@pytest.mark.parametrize("dtype,ent", [(torch.bfloat16, True), (torch.float16, False)])
def test_triton_gemm_cached_chunks(monkeypatch, cached, dtype, ent):
    """GPU_CACHE_BYTES keeps the first chunks' logits (input dtype) for the backward, which then runs
    one GEMM fewer per cached chunk; the partial last chunk is cached too when all fit."""
    n_valid, n_chunks = 5, 8  # 7 tokens, 2 ignored; 1000 columns in 128-column chunks
    monkeypatch.setattr(VT, "GPU_CHUNK_BYTES", n_valid * 4 * 128)
    monkeypatch.setattr(VT, "GPU_CACHE_BYTES", cached * n_valid * 128 * 2)
    calls = []
    mm = VT.mm_f32

    def counted(*args):
        calls.append(1)
        return mm(*args)

    monkeypatch.setattr(VT, "mm_f32", counted)
    check("triton", (7,), 72, 1000, dtype, 0.7, True, ent, impl="gemm")
    assert len(calls) == 2 * n_chunks - min(cached, n_chunks)


@pytest.mark.parametrize("backend", ["torch"] + (["triton", "triton-gemm"] if TRITON else []))
def test_huge_logits_no_nan(backend):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 16, generator=g, dtype=torch.float64) * 300
    w = torch.randn(33, 16, generator=g, dtype=torch.float64) * 8  # logits around +-1e4
    t = torch.randint(0, 33, (7,), generator=g)
    hh, ww = h.float().to(DEV).requires_grad_(), w.float().to(DEV).requires_grad_()
    lp, ent = linear_logprobs(hh, ww, t.to(DEV), return_entropy=True, **_impl(backend))
    (lp.sum() + ent.sum()).backward()
    for x in (lp, ent, hh.grad, ww.grad):
        assert torch.isfinite(x).all()
    assert (h @ w.t()).abs().max() > 5e3
    r_lp, r_ent = linear_logprobs_reference(h, w, t, return_entropy=True)
    # fp32 logits of size 1e4 carry ~1e-3 absolute rounding; the result must be that close
    torch.testing.assert_close(lp.double().cpu(), r_lp, rtol=0, atol=2e-2)
    torch.testing.assert_close(ent.double().cpu(), r_ent, rtol=0, atol=2e-2)


@pytest.mark.parametrize("backend", ["torch"] + (["triton", "triton-gemm"] if TRITON else []))
def test_all_ignored(backend):
    xs, t = _inputs((5,), 16, 33, torch.float32, True)
    t = torch.full_like(t, -100)
    h, w, b = (x.requires_grad_() for x in xs)
    lp, ent = linear_logprobs(h, w, t, b, return_entropy=True, **_impl(backend))
    assert (lp == 0).all() and (ent == 0).all()
    (lp.sum() + ent.sum()).backward()
    assert (h.grad == 0).all() and (w.grad == 0).all() and (b.grad == 0).all()


def test_custom_ignore_index_and_no_grad():
    xs, t = _inputs((9,), 16, 33, torch.float32, False, ignore=False)
    t[2] = 7
    with torch.no_grad():
        lp = linear_logprobs(xs[0], xs[1], t, ignore_index=7)
    ref = linear_logprobs_reference(xs[0], xs[1], t, ignore_index=7)
    assert lp[2] == 0
    torch.testing.assert_close(lp, ref, rtol=2e-5, atol=2e-5)


def test_only_entropy_gradient():
    xs, t = _inputs((7,), 16, 33, torch.float64, False)
    h = xs[0].requires_grad_()
    _, ent = linear_logprobs(h, xs[1], t, return_entropy=True)
    (g,) = torch.autograd.grad(ent.sum(), h)
    h2 = xs[0].detach().requires_grad_()
    _, ent2 = linear_logprobs_reference(h2, xs[1], t, return_entropy=True)
    (g2,) = torch.autograd.grad(ent2.sum(), h2)
    torch.testing.assert_close(g, g2)


@pytest.mark.parametrize("backend", ["torch"] + (["triton-gemm"] if TRITON else []))
def test_torch_compile_fullgraph(backend):
    xs, t = _inputs((2, 5), 16, 33, torch.float32, True)
    h, w, b = (x.requires_grad_() for x in xs)

    def f(h, w, b, t):
        lp, ent = linear_logprobs(h, w, t, b, temperature=0.7, return_entropy=True, **_impl(backend))
        return (lp * 2.0).sum() + ent.mean()

    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(h, w, b, t)
    grads = torch.autograd.grad(loss, (h, w, b))
    h2, w2, b2 = (x.detach().clone().requires_grad_() for x in xs)
    want = f(h2, w2, b2, t)
    torch.testing.assert_close(loss, want)
    for a, r in zip(grads, torch.autograd.grad(want, (h2, w2, b2))):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("bad", ["hidden_rank", "weight_rank", "d_mismatch", "bias_len", "float_targets",
                                 "target_range", "target_shape", "device", "temperature", "backend", "impl",
                                 "impl_backend"])
def test_bad_input(bad):
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    b = None
    kw = {}
    if bad == "hidden_rank":
        h, name = torch.tensor(1.0), "hidden"
    elif bad == "weight_rank":
        w, name = torch.randn(10, 8, 1), "weight"
    elif bad == "d_mismatch":
        w, name = torch.randn(10, 9), "weight"
    elif bad == "bias_len":
        b, name = torch.randn(11), "bias"
    elif bad == "float_targets":
        t, name = t.float(), "targets"
    elif bad == "target_range":
        t, name = torch.tensor([0, 1, 10, -100]), "targets"
    elif bad == "target_shape":
        t, name = torch.randint(0, 10, (5,)), "targets"
    elif bad == "device":
        w, name = torch.randn(10, 8, device="meta"), "weight"
    elif bad == "temperature":
        kw, name = {"temperature": 0.0}, "temperature"
    elif bad == "impl":
        kw, name = {"impl": "cublas"}, "impl"
    elif bad == "impl_backend":
        kw, name = {"backend": "torch", "impl": "gemm"}, "impl"
    else:
        kw, name = {"backend": "cuda"}, "backend"
    with pytest.raises(ValueError, match=name):
        linear_logprobs(h, w, t, b, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ent", [False, True])
def test_gpu_low_precision_vs_float64(dtype, ent):
    """Real bf16/fp16 tensor-core dots (the interpreter cannot check these)."""
    for lead, d, V in [((1000,), 256, 32000), ((3, 77), 576, 49152), ((300,), 128, 4099)]:
        check("triton", lead, d, V, dtype, 0.7, True, ent)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ent", [False, True])
def test_gpu_gemm_low_precision_vs_float64(dtype, ent):
    """impl="gemm" on real cuBLAS: bf16 operands with fp32 logits (out_dtype), chunked over the vocab."""
    for lead, d, V in [((1000,), 256, 32000), ((3, 77), 576, 49152), ((300,), 128, 4099)]:
        check("triton", lead, d, V, dtype, 0.7, True, ent, impl="gemm")


@pytest.mark.gpu
def test_gpu_fp32_vs_float64():
    check("triton", (513,), 192, 32000, torch.float32, 0.7, True, True)


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """N * V > 2^31: rows at the end must be right (int32 offsets would wrap)."""
    N, d, V = 16384, 64, 151936
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(N, d, device="cuda", generator=g).bfloat16()
    w = (torch.randn(V, d, device="cuda", generator=g) * 0.2).bfloat16().requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    hh = h.clone().requires_grad_()
    lp = linear_logprobs(hh, w, t, backend="triton")
    up = torch.zeros(N, device="cuda")
    up[-3:] = 1.0
    lp.backward(up)
    tail = slice(N - 3, N)
    h64 = h[tail].double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    ref = linear_logprobs_reference(h64, w64, t[tail])
    ref.sum().backward()
    torch.testing.assert_close(lp[tail].double(), ref, rtol=0, atol=2e-3)
    torch.testing.assert_close(hh.grad[tail].double(), h64.grad, rtol=2e-2, atol=2e-3)
    assert (hh.grad[: N - 3] == 0).all()
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=2e-2, atol=2e-3)
