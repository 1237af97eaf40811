"""sample: batch-invariant token sampling with temperature, top-p, top-k and per-row seeds.

Each row draws with the Gumbel-max trick: token = argmax(logits / T + g) over the tokens that
survive top-k/top-p, where g[v] = -log(-log(u[v])) and u[v] is a counter-based hash of
(seed, position, v). Nothing depends on the batch the row sits in, on other rows, or on a global
RNG: the same (seed, position, logits) always gives the same token, alone or in any batch.

The returned log-prob is that of the temperature-scaled distribution *before* truncation,
log_softmax(logits / T)[token] (what a trainer recomputes with temperature T); greedy rows (T == 0)
return log_softmax(logits)[token].
"""
from __future__ import annotations

import torch

from score_kernels import _checks

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's fmix32 on int64 tensors holding uint32 values. Products may wrap int64; only
    their low 32 bits are kept, and those are exact under two's-complement wrap."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A 32-bit key per row from the 64-bit seed and position."""
    s = seeds.long()
    p = positions.long()
    k = _mix32((s & _M32) ^ 0x9E3779B9)
    k = _mix32(k ^ ((s >> 32) & _M32))
    k = _mix32(k ^ (p & _M32) ^ 0x7F4A7C15)
    return _mix32(k ^ ((p >> 32) & _M32))


def uniforms(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """u[b, v] in (0, 1), float32, a pure function of (seeds[b], positions[b], v)."""
    key = row_keys(seeds, positions)[:, None]
    v = torch.arange(vocab, device=seeds.device, dtype=torch.int64)[None, :]
    h = _mix32(_mix32(key ^ v) ^ 0x2545F491)
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def _filter(scaled: torch.Tensor, top_p: torch.Tensor | None, top_k: torch.Tensor | None) -> torch.Tensor:
    """Sets the logits of tokens outside top-k / top-p to -inf (per row; always keeps the top token)."""
    vocab = scaled.shape[-1]
    srt, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab, device=scaled.device)[None, :]
    drop = torch.zeros_like(srt, dtype=torch.bool)
    if top_k is not None:
        k = top_k.to(device=scaled.device, dtype=torch.int64)[:, None]
        drop |= (k > 0) & (rank >= k)
    if top_p is not None:
        probs = torch.softmax(srt, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly above this token
        drop |= before >= top_p.to(device=scaled.device, dtype=torch.float32)[:, None]
    drop[:, 0] = False
    drop = drop.scatter(1, order, drop)
    return scaled.masked_fill(drop, float("-inf"))


def sample_reference(logits, temperature, top_p, top_k, seeds, positions):
    x = logits.to(torch.float32)
    t = temperature.to(device=x.device, dtype=torch.float32)
    greedy = t <= 0
    scaled = x / torch.where(greedy, torch.ones_like(t), t)[:, None]
    logp_all = torch.log_softmax(scaled, dim=-1)
    filt = scaled
    need_p = top_p is not None and bool((top_p < 1.0).any())
    need_k = top_k is not None and bool((top_k > 0).any())
    if need_p or need_k:
        filt = _filter(scaled, top_p if need_p else None, top_k if need_k else None)
    u = uniforms(seeds.to(x.device), positions.to(x.device), x.shape[-1])
    gumbel = -torch.log(-torch.log(u))
    drawn = torch.argmax(filt + gumbel, dim=-1)
    tokens = torch.where(greedy, torch.argmax(x, dim=-1), drawn)
    return tokens, logp_all.gather(1, tokens[:, None]).squeeze(1)


def sample(logits: torch.Tensor, *, temperature: torch.Tensor, top_p: torch.Tensor | None = None,
           top_k: torch.Tensor | None = None, seeds: torch.Tensor,
           positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws one token per row of logits [B, V]. Returns (tokens [B] int64, logprobs [B] float32).

    temperature [B] (0 = greedy); top_p [B] or None (1 = off); top_k [B] int or None (0 = off);
    seeds [B] int64; positions [B] int64 (the position the drawn token will occupy, or any counter
    that differs between the draws of one sequence). logprobs = log_softmax(logits / T)[token],
    before top-p/top-k truncation (log_softmax(logits)[token] for greedy rows).
    """
    _checks.tensor("logits", logits, floating=True, ndim=2)
    bsz = logits.shape[0]
    for name, t, integer in (("temperature", temperature, False), ("top_p", top_p, False),
                             ("top_k", top_k, True), ("seeds", seeds, True), ("positions", positions, True)):
        if t is None and name in ("top_p", "top_k"):
            continue
        _checks.tensor(name, t, floating=not integer, integer=integer, ndim=1)
        if t.shape[0] != bsz:
            raise ValueError(f"{name} must have shape [{bsz}] (one per logits row), got {tuple(t.shape)}")
        _checks.same_device(name, t, "logits", logits)
    return sample_reference(logits, temperature, top_p, top_k, seeds, positions)
