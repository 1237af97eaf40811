"""Paged KV-cache writes: `store_kv` (new K/V through a slot mapping) and `copy_blocks` (copy-on-write).

Cache layout, per layer: k_cache and v_cache are each [num_blocks, block_size, n_kv_heads, head_dim]
(any strides, last dim contiguous). A token's slot is block_index * block_size + offset.

Backends: "cuda" (csrc/cuda/kv_cache.cu), "cpu" (csrc/cpu/kv_cache.cpp), "torch" (the reference here).
Both ops mutate the caches in place and are torch.library custom ops with
mutates_args=("k_cache", "v_cache"), so torch.compile(fullgraph=True) traces callers.
"""
from __future__ import annotations

import torch

from score_kernels import _checks
from score_kernels._backend import pick_backend

_SUPPORTED = ("cuda", "cpu", "torch")
_EXT_OPS = ("store_kv", "copy_blocks")


# ----------------------------------------------------------------------------- references
def store_kv_reference(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Pure PyTorch: k_cache[slot] = key (slots < 0 skipped), in place."""
    bs = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blk, off = slots // bs, slots % bs
    k_cache[blk, off] = key[keep]
    v_cache[blk, off] = value[keep]


def copy_blocks_reference(k_cache, v_cache, block_mapping) -> None:
    """Pure PyTorch: k_cache[dst] = k_cache[src] for each (src, dst) row, in place."""
    src, dst = block_mapping[:, 0], block_mapping[:, 1]
    k_cache[dst] = k_cache[src]
    v_cache[dst] = v_cache[src]


# ----------------------------------------------------------------------------- torch.library
@torch.library.custom_op("score::store_kv", mutates_args=("k_cache", "v_cache"))
def _store_kv_op(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, backend: str) -> None:
    if backend in ("cuda", "cpu"):
        torch.ops.score_ext.store_kv(key, value, k_cache, v_cache, slot_mapping)
    else:
        store_kv_reference(key, value, k_cache, v_cache, slot_mapping)


@_store_kv_op.register_fake
def _(key, value, k_cache, v_cache, slot_mapping, backend):
    return None


@torch.library.custom_op("score::copy_blocks", mutates_args=("k_cache", "v_cache"))
def _copy_blocks_op(k_cache: torch.Tensor, v_cache: torch.Tensor, block_mapping: torch.Tensor, backend: str) -> None:
    if backend in ("cuda", "cpu"):
        torch.ops.score_ext.copy_blocks(k_cache, v_cache, block_mapping)
    else:
        copy_blocks_reference(k_cache, v_cache, block_mapping)


@_copy_blocks_op.register_fake
def _(k_cache, v_cache, block_mapping, backend):
    return None


# ----------------------------------------------------------------------------- checks
def check_caches(k_cache, v_cache) -> None:
    _checks.tensor("k_cache", k_cache, floating=True, ndim=4)
    _checks.tensor("v_cache", v_cache, floating=True, ndim=4)
    _checks.same_shape("v_cache", v_cache, "k_cache", k_cache)
    _checks.same_device("v_cache", v_cache, "k_cache", k_cache)
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache has dtype {v_cache.dtype} but k_cache has dtype {k_cache.dtype}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.shape[-1] > 1 and c.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last (head_dim) dimension, got strides {c.stride()}")


# ----------------------------------------------------------------------------- public API
def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, *, backend: str | None = None) -> None:
    """Writes key[i]/value[i] ([N, n_kv_heads, head_dim], the cache dtype) into slot slot_mapping[i]
    of k_cache/v_cache, in place; slot -1 (any negative slot) skips that row. Slots must be distinct
    and < num_blocks * block_size (not checked: that would sync the GPU).

    backend: None picks cuda ext -> cpu ext -> torch; or force one of those.
    """
    check_caches(k_cache, v_cache)
    _checks.tensor("key", key, floating=True, ndim=3)
    _checks.tensor("value", value, floating=True, ndim=3)
    _checks.tensor("slot_mapping", slot_mapping, integer=True, ndim=1)
    _checks.same_shape("value", value, "key", key)
    if tuple(key.shape[1:]) != tuple(k_cache.shape[2:]):
        raise ValueError(f"key has shape {tuple(key.shape)} but k_cache has (n_kv_heads, head_dim) = "
                         f"{tuple(k_cache.shape[2:])}")
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries but key has {key.shape[0]} rows")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != k_cache.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but k_cache has dtype {k_cache.dtype}")
    for name, t in (("key", key), ("value", value), ("slot_mapping", slot_mapping)):
        _checks.same_device(name, t, "k_cache", k_cache)
    if slot_mapping.dtype != torch.int64:
        slot_mapping = slot_mapping.long()
    b = pick_backend(backend, k_cache.device, supported=_SUPPORTED, ext_ops=_EXT_OPS, op="store_kv")
    _store_kv_op(key, value, k_cache, v_cache, slot_mapping, b)


def copy_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, block_mapping: torch.Tensor, *,
                backend: str | None = None) -> None:
    """Copies whole blocks in place: for each row (src, dst) of block_mapping [M, 2] (int64),
    k_cache[dst] = k_cache[src] and v_cache[dst] = v_cache[src] (copy-on-write of a shared tail).
    Destinations must be distinct and must not appear as sources (rows run in parallel).

    backend: None picks cuda ext -> cpu ext -> torch; or force one of those.
    """
    check_caches(k_cache, v_cache)
    _checks.tensor("block_mapping", block_mapping, integer=True, ndim=2)
    if block_mapping.shape[1] != 2:
        raise ValueError(f"block_mapping must have shape [M, 2], got {tuple(block_mapping.shape)}")
    _checks.same_device("block_mapping", block_mapping, "k_cache", k_cache)
    if block_mapping.dtype != torch.int64:
        block_mapping = block_mapping.long()
    b = pick_backend(backend, k_cache.device, supported=_SUPPORTED, ext_ops=_EXT_OPS, op="copy_blocks")
    _copy_blocks_op(k_cache, v_cache, block_mapping, b)
