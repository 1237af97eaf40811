import math

import pytest
import torch

from score_kernels import paged_attention, paged_attention_reference, store_kv
from score_kernels.paged_attention import _triton_paged_attention
from tests.helpers import device, live_backends

DEV = device()
BACKENDS = [b for b in live_backends(DEV) if b in ("torch", "triton")]
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_batch(ctx, qlens, hq, hkv, d, *, bs=16, dtype=torch.float32, dev=DEV, seed=0, spare=3, junk=-1,
               cache_view=False):
    """A paged cache holding random K/V for sequences of lengths ctx, stored through shuffled block
    tables (entries past a sequence's blocks hold `junk`), and packed queries for its last qlens positions."""
    g = torch.Generator().manual_seed(seed)
    nblk = [-(-c // bs) for c in ctx]
    nb = sum(nblk) + spare
    if cache_view:  # k and v interleaved in one pool: strided caches
        pool = torch.zeros(nb, bs, 2, hkv, d, dtype=dtype, device=dev)
        kc, vc = pool[:, :, 0], pool[:, :, 1]
    else:
        kc = torch.zeros(nb, bs, hkv, d, dtype=dtype, device=dev)
        vc = torch.zeros_like(kc)
    kc.copy_(torch.randn(kc.shape, generator=g).to(dtype))  # junk in unused slots too
    vc.copy_(torch.randn(vc.shape, generator=g).to(dtype))
    perm = torch.randperm(nb, generator=g)
    tables = torch.full((len(ctx), max(nblk) + 1), junk, dtype=torch.int32)
    i = 0
    for b, n in enumerate(nblk):
        tables[b, :n] = perm[i:i + n].int()
        i += n
    cu = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(cu[-1]), hq, d, generator=g).to(dtype)
    return q.to(dev), kc, vc, tables.to(dev), torch.tensor(ctx, dtype=torch.int32, device=dev), cu.to(dev)


def naive(q, kc, vc, tables, ctx, cu, scale=None):
    """Token-by-token float64 attention, independent of the reference's gather/mask code."""
    nq, hq, d = q.shape
    bs, hkv = kc.shape[1], kc.shape[2]
    scale = scale or 1 / math.sqrt(d)
    out = torch.zeros(nq, hq, d, dtype=torch.float64)
    for b in range(len(ctx)):
        c, s, e = int(ctx[b]), int(cu[b]), int(cu[b + 1])
        slots = [(int(tables[b, p // bs]), p % bs) for p in range(c)]
        k = torch.stack([kc[blk, o] for blk, o in slots]).double().cpu()
        v = torch.stack([vc[blk, o] for blk, o in slots]).double().cpu()
        for i in range(e - s):
            pos = c - (e - s) + i
            for h in range(hq):
                kh = h // (hq // hkv)
                w = torch.softmax(k[:pos + 1, kh] @ q[s + i, h].double().cpu() * scale, 0)
                out[s + i, h] = w @ v[:pos + 1, kh]
    return out


def test_reference_matches_naive_loop():
    args = make_batch([1, 15, 16, 17, 33], [1, 15, 1, 5, 2], 6, 2, 8, bs=4, dtype=torch.float64, dev="cpu")
    torch.testing.assert_close(paged_attention_reference(*args), naive(*args), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(paged_attention_reference(*args, scale=0.3), naive(*args, scale=0.3),
                               rtol=1e-10, atol=1e-10)


MIXED = ([1, 15, 16, 17, 40], [1, 15, 1, 5, 3])  # prefill (ctx == q_len), decode, extend
DECODE = ([1, 15, 16, 17], [1, 1, 1, 1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grp", [1, 3, 8])
@pytest.mark.parametrize("batch", [MIXED, DECODE], ids=["mixed", "decode"])
def test_matches_float64(backend, grp, batch):
    hkv = 2 if grp < 8 else 1
    q, kc, vc, bt, ctx, cu = make_batch(*batch, grp * hkv, hkv, 16, junk=-1 if grp != 3 else 0)
    out = paged_attention(q, kc, vc, bt, ctx, cu, backend=backend)
    assert out.dtype == q.dtype and out.shape == q.shape
    want = paged_attention_reference(q.double(), kc.double(), vc.double(), bt, ctx, cu)
    torch.testing.assert_close(out.double(), want, rtol=TOL[q.dtype], atol=TOL[q.dtype])


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not live")
@pytest.mark.parametrize("splits", [None, 2, 3])
def test_triton_split_k_decode(splits):
    # default (None) also splits here: the interpreter pretends to have 4 SMs
    q, kc, vc, bt, ctx, cu = make_batch([3, 17, 50], [1, 1, 1], 4, 2, 32, bs=8)
    out = _triton_paged_attention(q, kc, vc, bt, ctx, cu, 32 ** -0.5, num_splits=splits)
    want = paged_attention_reference(q.double(), kc.double(), vc.double(), bt, ctx, cu)
    torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not live")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision_strided(dtype):
    # strided caches (k/v interleaved in one pool) and q sliced out of a fused qkv tensor
    q, kc, vc, bt, ctx, cu = make_batch([20, 9], [4, 1], 4, 1, 24, bs=8, dtype=dtype, cache_view=True)
    qkv = torch.cat([q, torch.zeros(q.shape[0], 2, q.shape[2], dtype=dtype, device=q.device)], 1)
    qs = qkv[:, :4]
    assert not qs.is_contiguous() and not kc.is_contiguous()
    out = paged_attention(qs, kc, vc, bt, ctx, cu, backend="triton")
    want = paged_attention_reference(q.double(), kc.double(), vc.double(), bt, ctx, cu)
    torch.testing.assert_close(out.double(), want, rtol=TOL[dtype], atol=TOL[dtype])


def test_empty_query_rows_and_int64_indices():
    q, kc, vc, bt, ctx, cu = make_batch([5, 7], [0, 2], 2, 1, 8, bs=4, dtype=torch.float64, dev="cpu")
    out = paged_attention(q, kc, vc, bt.long(), ctx.long(), cu.long())
    torch.testing.assert_close(out, naive(q, kc, vc, bt, ctx, cu), rtol=1e-10, atol=1e-10)


def test_prefill_then_decode_through_store_kv():
    # the engine's pattern: store the new K/V, then attend; decode after a prefill sees the prompt
    torch.manual_seed(0)
    hq, hkv, d, bs = 4, 2, 8, 4
    kc = torch.zeros(8, bs, hkv, d)
    vc = torch.zeros_like(kc)
    bt = torch.tensor([[5, 2, 7, 0]], dtype=torch.int32)
    k, v, q = torch.randn(10, hkv, d), torch.randn(10, hkv, d), torch.randn(10, hq, d)
    pos = torch.arange(10)
    slots = bt[0].long()[pos // bs] * bs + pos % bs
    store_kv(k[:9], v[:9], kc, vc, slots[:9])
    pre = paged_attention(q[:9], kc, vc, bt, torch.tensor([9]), torch.tensor([0, 9]))
    store_kv(k[9:], v[9:], kc, vc, slots[9:])
    dec = paged_attention(q[9:], kc, vc, bt, torch.tensor([10]), torch.tensor([0, 1]))
    full = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1),
        is_causal=True).transpose(0, 1)
    torch.testing.assert_close(torch.cat([pre, dec]), full, rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_argument():
    q, kc, vc, bt, ctx, cu = make_batch([5], [5], 4, 2, 8, bs=4, dev="cpu")
    with pytest.raises(ValueError, match="q has 3 heads"):
        paged_attention(q[:, :3], kc, vc, bt, ctx, cu)
    with pytest.raises(ValueError, match="block_tables"):
        paged_attention(q, kc, vc, bt.float(), ctx, cu)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        paged_attention(q, kc, vc, bt, ctx, cu[:1])
    with pytest.raises(ValueError, match="v_cache"):
        paged_attention(q, kc, vc[..., :4], bt, ctx, cu)
    with pytest.raises(ValueError, match="head_dim"):
        paged_attention(q[..., :4], kc, vc, bt, ctx, cu)
    with pytest.raises(ValueError, match="backend"):
        paged_attention(q, kc, vc, bt, ctx, cu, backend="cuda")


def test_traceable_by_torch_compile():
    q, kc, vc, bt, ctx, cu = make_batch([6, 3], [2, 1], 4, 2, 8, bs=4, dev="cpu")

    def step(q, k, v, slots):
        store_kv(k, v, kc, vc, slots)
        return paged_attention(q, kc, vc, bt, ctx, cu) * 2

    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    slots = torch.tensor([-1, -1, -1])
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, slots)
    torch.testing.assert_close(got, 2 * paged_attention_reference(q, kc, vc, bt, ctx, cu))


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,d", [(14, 2, 64), (32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("kind", ["decode_small", "decode_big", "mixed"])
def test_gpu_bf16_matches_reference(hq, hkv, d, kind):
    if kind == "decode_small":  # split-K path
        ctx, ql = [700, 33, 1, 16], [1, 1, 1, 1]
    elif kind == "decode_big":
        ctx = [int(x) for x in torch.randint(1, 400, (300,), generator=torch.Generator().manual_seed(1))]
        ql = [1] * len(ctx)
    else:
        ctx, ql = [300, 1, 17, 129, 64, 500], [300, 1, 5, 1, 64, 37]
    q, kc, vc, bt, ctx_t, cu = make_batch(ctx, ql, hq, hkv, d, dtype=torch.bfloat16, dev="cuda")
    out = paged_attention(q, kc, vc, bt, ctx_t, cu)
    want = paged_attention_reference(q.float(), kc.float(), vc.float(), bt, ctx_t, cu)
    torch.testing.assert_close(out.float(), want, rtol=3e-2, atol=3e-2)
    out32 = paged_attention(q.float(), kc.float(), vc.float(), bt, ctx_t, cu, backend="triton")
    torch.testing.assert_close(out32, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay():
    q, kc, vc, bt, ctx, cu = make_batch([100, 7, 300], [1, 1, 1], 14, 2, 64, dtype=torch.bfloat16, dev="cuda")
    out = paged_attention(q, kc, vc, bt, ctx, cu)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out_g = paged_attention(q, kc, vc, bt, ctx, cu)
    ctx.add_(0)
    g.replay()
    torch.testing.assert_close(out_g, out)


@pytest.mark.parametrize("junk", [-1, 10 ** 6])
def test_torch_plan_buckets_and_reuse(junk):
    # decode rows of very different context lengths (several buckets, in shuffled order), a prefill and an
    # extend, junk past each table's blocks; one TorchPlan serves two "layers" with different caches
    from score_kernels.paged_attention import TorchPlan
    ctx = [3, 200, 17, 150, 64, 1, 90, 33, 120, 5, 180, 49, 7, 140, 60, 11, 100, 2, 160, 40, 24, 30]
    qlens = [1] * 20 + [24, 6]
    q, kc, vc, bt, cl, cu = make_batch(ctx, qlens, 6, 2, 8, bs=4, dev="cpu", junk=junk)
    plan = TorchPlan(bt, cl, cu, 4)
    assert len(plan.buckets) > 1 and plan.num_dec == 20 and len(plan.other) == 2
    for layer in range(2):
        k2, v2 = (kc, vc) if layer == 0 else (vc.flip(0).contiguous(), kc * 0.5)
        out = paged_attention(q, k2, v2, bt, cl, cu, plan=plan)
        want = naive(q, k2, v2, bt, cl, cu)
        torch.testing.assert_close(out.double(), want, rtol=TOL[torch.float32], atol=TOL[torch.float32])
        torch.testing.assert_close(out, paged_attention(q, k2, v2, bt, cl, cu), rtol=0, atol=0)
