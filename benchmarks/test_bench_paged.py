"""Paged KV cache: decode attention over shuffled block tables, and store_kv, each vs the PyTorch
reference in score_kernels (the reference is also the CPU path of paged_attention, so on the CPU this
pair guards the wrapper's overhead; on a GPU it measures the Triton kernel)."""
import pytest
import torch

from benchmarks.conftest import VARIANTS
from benchmarks.memory_probe import device_for
from benchmarks.shapes import shape
from score_kernels import paged_attention, paged_attention_reference, store_kv, store_kv_reference


def _dtype(machine):
    return torch.bfloat16 if machine == "gpu" else torch.float32


def case_paged_attention(machine: str) -> dict:
    s, dev, dt = shape(machine, "paged_attention_decode"), device_for(machine), _dtype(machine)
    B, ctx, hq, hkv, d, bs = s["B"], s["ctx"], s["Hq"], s["Hkv"], s["D"], s.get("block_size", 16)
    g = torch.Generator(device=dev).manual_seed(0)
    per_seq = -(-ctx // bs)
    nblocks = B * per_seq + 1
    k_cache = torch.randn(nblocks, bs, hkv, d, generator=g, device=dev).to(dt)
    v_cache = torch.randn(nblocks, bs, hkv, d, generator=g, device=dev).to(dt)
    tables = torch.randperm(nblocks, generator=g, device=dev)[: B * per_seq].reshape(B, per_seq).to(torch.int32)
    lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
    cu = torch.arange(B + 1, dtype=torch.int32, device=dev)
    q = torch.randn(B, hq, d, generator=g, device=dev).to(dt)
    args = (q, k_cache, v_cache, tables, lens, cu)
    return {"shape": f"decode B={B} ctx={ctx} Hq={hq} Hkv={hkv} D={d} {str(dt)[6:]}",
            "ours": lambda: paged_attention(*args), "baseline": lambda: paged_attention_reference(*args),
            "rounds": 9, "iterations": 16}


def case_store_kv(machine: str) -> dict:
    s, dev, dt = shape(machine, "store_kv"), device_for(machine), _dtype(machine)
    n, hkv, d, bs = s["N"], s["Hkv"], s["D"], s.get("block_size", 16)
    g = torch.Generator(device=dev).manual_seed(0)
    nblocks = 2 * (-(-n // bs))
    k_cache = torch.zeros(nblocks, bs, hkv, d, device=dev, dtype=dt)
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(n, hkv, d, generator=g, device=dev).to(dt)
    value = torch.randn(n, hkv, d, generator=g, device=dev).to(dt)
    slots = torch.randperm(nblocks * bs, generator=g, device=dev)[:n]
    slots[::97] = -1  # padding rows are skipped
    args = (key, value, k_cache, v_cache, slots)
    return {"shape": f"N={n} Hkv={hkv} D={d} {str(dt)[6:]}",
            "ours": lambda: store_kv(*args), "baseline": lambda: store_kv_reference(*args), "rounds": 9,
            "iterations": 8}


CASES = {"paged_attention": case_paged_attention, "store_kv": case_store_kv}


@pytest.mark.parametrize("variant", VARIANTS)
def test_paged_attention(paired, variant):
    paired("paged_attention", variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_store_kv(paired, variant):
    paired("store_kv", variant)
