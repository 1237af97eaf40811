import pytest
import torch

from score_kernels import copy_blocks, copy_blocks_reference, store_kv
from tests.helpers import device, live_backends

DEV = device()
BACKENDS = [b for b in live_backends(DEV) if b in ("torch", "cpu", "cuda")]


def caches(nb=6, bs=4, hkv=3, d=8, dtype=torch.float32, dev=DEV, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if strided:  # k and v interleaved in one pool: non-contiguous caches
        pool = torch.randn(nb, bs, 2, hkv, d, generator=g).to(dev, dtype)
        return pool[:, :, 0], pool[:, :, 1]
    return (torch.randn(nb, bs, hkv, d, generator=g).to(dev, dtype),
            torch.randn(nb, bs, hkv, d, generator=g).to(dev, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("strided", [False, True])
def test_store_kv_writes_slots_and_skips_minus_one(backend, dtype, strided):
    kc, vc = caches(dtype=dtype, strided=strided)
    k0, v0 = kc.clone(), vc.clone()
    n = 7
    kv = torch.randn(n, 2, 3, 8).to(DEV, dtype)  # key/value sliced from one tensor: strided rows
    key, value = kv[:, 0], kv[:, 1]
    slots = torch.tensor([0, 5, -1, 23, 9, -1, 10], device=DEV)
    store_kv(key, value, kc, vc, slots, backend=backend)
    want_k, want_v = k0.clone(), v0.clone()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            want_k[s // 4, s % 4] = key[i]
            want_v[s // 4, s % 4] = value[i]
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True])
def test_copy_blocks_copies_whole_blocks(backend, dtype, strided):
    kc, vc = caches(dtype=dtype, strided=strided)
    k0, v0 = kc.clone(), vc.clone()
    mapping = torch.tensor([[1, 4], [1, 5], [3, 0]], device=DEV)
    copy_blocks(kc, vc, mapping, backend=backend)
    want_k, want_v = k0.clone(), v0.clone()
    copy_blocks_reference(want_k, want_v, mapping)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    assert torch.equal(kc[4], k0[1]) and torch.equal(vc[0], v0[3]) and torch.equal(kc[2], k0[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs_are_noops(backend):
    kc, vc = caches()
    k0 = kc.clone()
    store_kv(torch.empty(0, 3, 8, device=DEV), torch.empty(0, 3, 8, device=DEV), kc, vc,
             torch.empty(0, dtype=torch.long, device=DEV), backend=backend)
    copy_blocks(kc, vc, torch.empty(0, 2, dtype=torch.long, device=DEV), backend=backend)
    assert torch.equal(kc, k0)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="CPU extension not built")
def test_cpu_ext_rejects_out_of_range():
    kc, vc = caches()
    x = torch.randn(1, 3, 8)
    with pytest.raises(RuntimeError, match="out of range"):
        store_kv(x, x, kc, vc, torch.tensor([24]), backend="cpu")
    with pytest.raises(RuntimeError, match="out of range"):
        copy_blocks(kc, vc, torch.tensor([[0, 6]]), backend="cpu")


def test_bad_inputs_name_the_argument():
    kc, vc = caches(dev="cpu")
    x = torch.randn(2, 3, 8)
    s = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="key has dtype"):
        store_kv(x.double(), x.double(), kc, vc, s)
    with pytest.raises(ValueError, match="key has shape"):
        store_kv(x[:, :2], x[:, :2], kc, vc, s)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv(x, x, kc, vc, s[:1])
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv(x, x, kc, vc, s.float())
    with pytest.raises(ValueError, match="v_cache"):
        store_kv(x, x, kc, vc.half(), s)
    with pytest.raises(ValueError, match="block_mapping"):
        copy_blocks(kc, vc, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="k_cache"):
        copy_blocks(kc.transpose(2, 3), vc.transpose(2, 3), torch.tensor([[0, 1]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_traceable_by_torch_compile(backend):
    kc, vc = caches()
    want_k, want_v = kc.clone(), vc.clone()

    def step(k, v, slots, mapping):
        store_kv(k, v, kc, vc, slots, backend=backend)
        copy_blocks(kc, vc, mapping, backend=backend)
        return kc.sum()

    k, v = torch.randn(2, 3, 8, device=DEV), torch.randn(2, 3, 8, device=DEV)
    slots, mapping = torch.tensor([1, -1], device=DEV), torch.tensor([[0, 5]], device=DEV)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(k, v, slots, mapping)
    want_k[0, 1], want_v[0, 1] = k[0], v[0]
    copy_blocks_reference(want_k, want_v, mapping)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    torch.testing.assert_close(got, want_k.sum())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_cuda_ext_matches_torch(dtype):
    if "cuda" not in BACKENDS:
        pytest.skip("CUDA extension not built")
    kc, vc = caches(nb=64, bs=16, hkv=2, d=64, dtype=dtype, dev="cuda", strided=True)
    kt, vt = kc.clone(), vc.clone()
    key, value = torch.randn(300, 2, 64, device="cuda", dtype=dtype), torch.randn(300, 2, 64, device="cuda",
                                                                                   dtype=dtype)
    slots = torch.randperm(64 * 16, device="cuda")[:300]
    slots[::7] = -1
    store_kv(key, value, kc, vc, slots, backend="cuda")
    store_kv(key, value, kt, vt, slots, backend="torch")
    assert torch.equal(kc, kt) and torch.equal(vc, vt)
    mapping = torch.tensor([[3, 40], [7, 41], [3, 50]], device="cuda")
    copy_blocks(kc, vc, mapping, backend="cuda")
    copy_blocks(kt, vt, mapping, backend="torch")
    assert torch.equal(kc, kt) and torch.equal(vc, vt)
