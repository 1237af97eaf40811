"""GPU benchmark: paged attention (Triton) vs the PyTorch reference, Qwen2.5-0.5B attention shape, bf16.

Decode is bandwidth-bound: its roofline is the KV bytes read (B * ctx * Hkv * D * 2 bytes, K and V)
over the measured copy bandwidth. Also: a small-batch long-context decode with and without split-K,
a prefill (tensor-core bound, TF/s of the causal QK^T and PV), and the decode sampler
(B rows x Qwen2.5's 151936-token vocabulary, bf16 logits read once). "_graph" variants replay the op
from a CUDA graph, as the engine's decode does: the eager variants at these sizes mostly time the
Python/Triton launch overhead (~80 us), not the kernel.
"""
import torch

from benchmarks import gpu_timing as gt
from benchmarks.gpu_timing import bench, row
from benchmarks.shapes import shape
from score_kernels import paged_attention, paged_attention_reference
from score_kernels.paged_attention import _triton_paged_attention
from score_kernels.sampling import _sample_triton, sample_reference

SMOKE = {"Hq": 4, "Hkv": 2, "D": 16, "block_size": 4, "decode": {"B": 2, "ctx": 9},
         "decode_small": {"B": 1, "ctx": 13}, "prefill": {"B": 1, "q_len": 5}}


def _batch(B, ctx, q_len, hq, hkv, d, bs, seed=0):
    dev = gt.device()
    g = torch.Generator(device=dev).manual_seed(seed)
    per_seq = -(-ctx // bs)
    nblocks = B * per_seq + 1
    dt = torch.bfloat16 if gt.on_gpu() else torch.float32
    kc = torch.randn(nblocks, bs, hkv, d, device=dev, dtype=dt, generator=g)
    vc = torch.randn(nblocks, bs, hkv, d, device=dev, dtype=dt, generator=g)
    tables = torch.randperm(nblocks, device=dev, generator=g)[: B * per_seq].reshape(B, per_seq).int()
    lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
    cu = torch.arange(B + 1, dtype=torch.int32, device=dev) * q_len
    q = torch.randn(B * q_len, hq, d, device=dev, dtype=dt, generator=g)
    return q, kc, vc, tables, lens, cu


def _graphed(fn, make):
    """Inputs for timing fn inside a CUDA graph (as the engine's decode runs it): no launch overhead."""
    def make_graph():
        args = make()
        fn(*args)  # compile outside the capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn(*args)
        return (g, args)
    return make_graph


def _replay(g, args):
    g.replay()


def _run(rows, op, shp, variants, make, **kw):
    for variant, fn in variants:
        if variant.endswith("_graph") and not gt.on_gpu():
            continue  # CUDA graphs: GPU only
        try:
            if variant.endswith("_graph"):
                res = bench(_replay, _graphed(fn, make))
            else:
                res = bench(fn, make)
        except Exception as e:  # noqa: BLE001  a backend that is not live on this machine
            rows.append(gt.error_row(op, shp, variant, e))
            continue
        rows.append(row(op, shp, variant, res, **kw))


def run(quick: bool = False) -> list[dict]:
    s = SMOKE if gt.smoke() else shape("gpu", "paged_attention")
    hq, hkv, d, bs = s["Hq"], s["Hkv"], s["D"], s["block_size"]
    rows = []
    scale = d ** -0.5

    dec = s["decode"]
    B, ctx = dec["B"], dec["ctx"]
    kv_bytes = 2 * B * ctx * hkv * d * 2
    _run(rows, "paged_attn_decode", f"B={B} ctx={ctx} {hq}/{hkv}x{d}",
         [("torch_ref", paged_attention_reference), ("triton", paged_attention), ("triton_graph", paged_attention)],
         lambda: _batch(B, ctx, 1, hq, hkv, d, bs), bytes_moved=kv_bytes)

    sm = s["decode_small"]
    B, ctx = sm["B"], sm["ctx"]
    kv_bytes = 2 * B * ctx * hkv * d * 2
    _run(rows, "paged_attn_decode", f"B={B} ctx={ctx} {hq}/{hkv}x{d}",
         [("torch_ref", paged_attention_reference),
          ("triton_no_split", lambda *a: _triton_paged_attention(*a, scale, num_splits=1)),
          ("triton_split_k", paged_attention),
          ("triton_no_split_graph", lambda *a: _triton_paged_attention(*a, scale, num_splits=1)),
          ("triton_split_k_graph", paged_attention)],
         lambda: _batch(B, ctx, 1, hq, hkv, d, bs), bytes_moved=kv_bytes)

    if not quick:
        pf = s["prefill"]
        B, ql = pf["B"], pf["q_len"]
        flops = 4 * B * hq * d * ql * (ql + 1) / 2  # causal QK^T + PV
        _run(rows, "paged_attn_prefill", f"B={B} q={ql} {hq}/{hkv}x{d}",
             [("torch_ref", paged_attention_reference), ("triton", paged_attention),
              ("triton_graph", paged_attention)],
             lambda: _batch(B, ql, ql, hq, hkv, d, bs), flops=flops)

    B, V = dec["B"], 300 if gt.smoke() else 151936
    dev = gt.device()

    def make_logits():
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(B, V, device=dev, generator=g).to(torch.bfloat16) * 3
        return (x, torch.full((B,), 0.8, device=dev), torch.arange(B, device=dev),
                torch.full((B,), 700, device=dev))
    _run(rows, "sample", f"B={B} V={V} bf16",
         [("torch_batched", lambda x, t, s_, p: sample_reference(x, t, None, None, s_, p)),
          ("triton", lambda x, t, s_, p: _sample_triton(x, t, s_, p))],
         make_logits, bytes_moved=B * V * 2)
    return rows
