"""The trainer's optimisation step as it was at commit 693d5f9, frozen here as the baseline of the trainer-step
speed benchmark (benchmarks/test_bench_train.py, issue 14: >= 2x on the same samples).

A faithful copy of that commit's `train._layer / forward_pair / policy_logprobs / train_step` and of its CPU packed
attention (3-d SDPA per sequence), single-process, with the same loss calls. Benchmark-only: nothing imports it.
"""
from __future__ import annotations

import itertools
import math
import time

import torch
import torch.nn.functional as F

from score_train import algos, packing


def _packed_attention_cpu(q, k, v, cu_seqlens, scale):
    gqa = q.shape[1] != k.shape[1]
    out = torch.empty_like(q)
    for s, e in itertools.pairwise(cu_seqlens.tolist()):
        if e > s:
            o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
                                               v[s:e].transpose(0, 1), is_causal=True, scale=scale,
                                               enable_gqa=gqa)
            out[s:e] = o.transpose(0, 1)
    return out


def _rope(model, positions, dtype):
    inv = model.inv_freq.to(positions.device)
    freqs = positions[:, None].float() * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * model.rope_scale).to(dtype), (emb.sin() * model.rope_scale).to(dtype)


def _layer(layer, x, cos, sin, cu, scale):
    h = layer.input_layernorm(x)
    q, k, v = layer.self_attn.qkv(h, cos, sin)
    a = _packed_attention_cpu(q, k, v, cu, scale)
    x = x + layer.self_attn.o_proj(a.reshape(x.shape[0], -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def forward_pair(model, ref, batch, cut, *, need_ref):
    ids, pos, cu = batch.input_ids, batch.position_ids, batch.cu_seqlens
    with torch.no_grad():
        x = model.model.embed_tokens(ids)
        cos, sin = _rope(model, pos, x.dtype)
        for layer in model.model.layers[:cut]:
            x = _layer(layer, x, cos, sin, cu, model.scale)
    h = x
    for layer in model.model.layers[cut:]:
        h = _layer(layer, h, cos, sin, cu, model.scale)
    hidden = model.model.norm(h)
    ref_hidden = None
    if need_ref:
        with torch.no_grad():
            r = x
            for layer in ref.model.layers[cut:]:
                r = _layer(layer, r, cos, sin, cu, ref.scale)
            ref_hidden = ref.model.norm(r)
    return hidden, ref_hidden


def policy_logprobs(hidden, weight, batch):
    import score_kernels as ops

    sel = batch.turn_ids >= 0
    lp = ops.linear_logprobs(hidden[sel], weight, batch.targets[sel])
    full = torch.zeros(hidden.shape[0], dtype=torch.float32)
    return full.masked_scatter(sel, lp.float()), sel


def train_step(model, ref, optimizer, samples, values, st, cfg, cut) -> dict:
    """693d5f9's train_step for one process, the sampled-KL (k1/k2/k3) path (the demo's)."""
    import score_kernels as ops

    a = cfg.algo
    need_ref = ref is not None and any(c > 0 for c in st.kl_coef)
    groups = packing.micro_batches(samples, cfg.optim.micro_batch_tokens)
    batches = [packing.pack_samples([samples[i] for i in g], rows=g) for g in groups]
    n_tok = sum(b.num_policy_tokens for b in batches)
    K = st.num_turns
    trainable = [p for p in model.parameters() if p.requires_grad]
    old = [None] * len(batches)
    if cfg.optim.epochs > 1 or a.clip_eps > 0:  # the behaviour policy's log-probs from an extra forward
        with torch.no_grad():
            for j, b in enumerate(batches):
                old[j] = policy_logprobs(forward_pair(model, None, b, cut, need_ref=False)[0],
                                         model.lm_head_weight, b)[0]
    t0 = time.perf_counter()
    total_loss = grad_norm = 0.0
    for _epoch in range(cfg.optim.epochs):
        optimizer.zero_grad(set_to_none=True)
        for j, b in enumerate(batches):
            hidden, ref_hidden = forward_pair(model, ref, b, cut, need_ref=need_ref)
            lp, _ = policy_logprobs(hidden, model.lm_head_weight, b)
            kw = {"old_logprobs": old[j], "clip_eps": a.clip_eps or None, "agg": a.agg, "cu_seqlens": b.cu_seqlens,
                  "num_turns": K, "global_token_count": n_tok}
            adv = packing.token_values(values, b)
            if need_ref:
                with torch.no_grad():
                    ref_lp, _ = policy_logprobs(ref_hidden, ref.lm_head_weight, b)
                loss, _ = ops.policy_loss(lp, adv, b.turn_ids, ref_logprobs=ref_lp, kl_coef=list(st.kl_coef),
                                          kl_estimator=a.kl, **kw)
            else:
                loss, _ = ops.policy_loss(lp, adv, b.turn_ids, kl_coef=[0.0] * K, **kw)
            loss.backward()
            total_loss += float(loss.detach())
        if cfg.optim.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip))
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"non-finite gradient norm {grad_norm}")
        optimizer.step()
    return {"loss": total_loss / cfg.optim.epochs, "grad_norm": grad_norm, "update_s": time.perf_counter() - t0}
