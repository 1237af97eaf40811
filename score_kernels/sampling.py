"""sample: batch-invariant token sampling with temperature, top-p, top-k and per-row seeds.

Each row draws with the Gumbel-max trick (an exponential race): token = argmax(logits / T - log E[v])
over the tokens that survive top-k/top-p, where E[v] = -log(1 - u[v]) ~ Exponential(1) and u[v] is a
counter-based hash (murmur3 fmix32) of (seed, position, v). Nothing depends on the batch the row sits in, on other rows, or on a global
RNG: the same (seed, position, logits) always gives the same token, alone or in any batch.

The returned log-prob is that of the temperature-scaled distribution *before* truncation,
log_softmax(logits / T)[token] (what a trainer recomputes with temperature T); greedy rows (T == 0)
return log_softmax(logits)[token].
"""
from __future__ import annotations

import torch

from score_kernels import _checks

_M32 = 0xFFFFFFFF
_C1, _C2 = 0x85EBCA6B - (1 << 32), 0xC2B2AE35 - (1 << 32)  # murmur3 fmix32 constants as int32
# A uniform u = (k + 0.5) / 2**23 lies in [2**-24, 1 - 2**-24], so the Gumbel noise -log(-log1p(-u))
# lies in [-2.82, 16.64]: a token whose scaled logit is more than 19.45 below its row's best can never
# win the argmax. Skipping those tokens is exact; 20 leaves room for rounding.
_REACH = 20.0


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's fmix32 on int64 tensors holding uint32 values (used on the few per-row keys)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def _to_i32(x: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the int32 with the same bits."""
    return torch.where(x >= (1 << 31), x - (1 << 32), x).to(torch.int32)


def row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A 32-bit key (as int32) per row from the 64-bit seed and position."""
    s = seeds.long()
    p = positions.long()
    k = _mix32((s & _M32) ^ 0x9E3779B9)
    k = _mix32(k ^ ((s >> 32) & _M32))
    k = _mix32(k ^ (p & _M32) ^ 0x7F4A7C15)
    return _to_i32(_mix32(k ^ ((p >> 32) & _M32)))


def _vocab_code(cols: torch.Tensor) -> torch.Tensor:
    return _to_i32((cols.long() * 0x9E3779B1) & _M32)  # odd multiplier: a bijection of the index


def _exp_noise(key: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Exponential(1) variates E = -log(1 - u), u from fmix32(key ^ code) in int32 arithmetic (products
    wrap; arithmetic shifts are masked into logical ones). A pure function of (key, code) per element."""
    x = key ^ code
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _C1
    x = x ^ ((x >> 13) & 0x7FFFF)
    x = x * _C2
    x = x ^ ((x >> 16) & 0xFFFF)
    u = (((x >> 9) & 0x7FFFFF).to(torch.float32) + 0.5) * (1.0 / (1 << 23))
    return -torch.log1p(-u)


def uniforms(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """u[b, v] = 1 - exp(-E[b, v]) in (0, 1), the uniforms behind the draws (for tests)."""
    return -torch.expm1(-_exp_noise(row_keys(seeds, positions)[:, None], _codes(vocab, seeds.device)[None, :]))


def _filter(scaled: torch.Tensor, top_p: torch.Tensor | None, top_k: torch.Tensor | None) -> torch.Tensor:
    """Sets the logits of tokens outside top-k / top-p to -inf (last dim; always keeps the top token).
    top-p keeps a token while the probability mass strictly above it is < top_p; top_p >= 1 is off."""
    vocab = scaled.shape[-1]
    srt, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab, device=scaled.device)
    drop = torch.zeros_like(srt, dtype=torch.bool)
    if top_k is not None:
        k = top_k.to(torch.int64)[..., None]
        drop |= (k > 0) & (rank >= k)
    if top_p is not None:
        probs = torch.softmax(srt, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly above this token
        tp = top_p.to(torch.float32)[..., None]
        drop |= (tp < 1.0) & (before >= tp)
    drop[..., 0] = False
    drop = drop.scatter(-1, order, drop)
    return scaled.masked_fill(drop, float("-inf"))


_CODES: dict = {}


def _codes(vocab: int, device: torch.device) -> torch.Tensor:
    key = (vocab, str(device))
    if key not in _CODES:
        _CODES[key] = _vocab_code(torch.arange(vocab, device=device))
    return _CODES[key]


def _draw_row(s: torch.Tensor, key: torch.Tensor, top_p: float, top_k: int, lse: torch.Tensor) -> torch.Tensor:
    """One row (CPU): the exponential race over the tokens that survive top-k/top-p and can still win
    (exact, see _REACH). top-k/top-p look at a growing top-m prefix instead of sorting the vocabulary."""
    vocab = s.shape[0]
    codes = _codes(vocab, s.device)
    if top_p >= 1.0 and top_k <= 0:
        cols = (s >= s.max() - _REACH).nonzero()[:, 0]
        vals = s[cols]
    else:
        cap = vocab if top_k <= 0 else min(top_k, vocab)
        m = min(cap, 64)
        while True:
            vals, cols = torch.topk(s, m)
            if top_p >= 1.0:
                break
            probs = torch.exp(vals - lse)
            keep = (torch.cumsum(probs, 0) - probs) < top_p  # mass strictly above each token
            keep[0] = True
            if not bool(keep[-1]) or m == cap:
                vals, cols = vals[keep], cols[keep]
                break
            m = min(cap, m * 4)
    race = vals - torch.log(_exp_noise(key, codes[cols]))
    return cols[torch.argmax(race)]


def sample_reference(logits, temperature, top_p, top_k, seeds, positions, _batched=False):
    """CPU tensors run row by row, so every row's arithmetic (and its vectorisation) is the same alone or
    in any batch; other devices run batched, where each element is computed the same way anywhere."""
    x = logits
    t = temperature.to(torch.float32)
    greedy = t <= 0
    t = torch.where(greedy, torch.ones_like(t), t)
    keys = row_keys(seeds, positions)
    if x.device.type == "cpu" and not _batched:
        tokens = torch.empty(x.shape[0], dtype=torch.int64)
        logprobs = torch.empty(x.shape[0], dtype=torch.float32)
        greedy_l, t_l = greedy.tolist(), t.tolist()
        tp_l = [1.0] * x.shape[0] if top_p is None else top_p.tolist()
        tk_l = [0] * x.shape[0] if top_k is None else top_k.tolist()
        for b in range(x.shape[0]):
            s = x[b].to(torch.float32)
            if not greedy_l[b] and t_l[b] != 1.0:
                s = s / t_l[b]
            lse = torch.logsumexp(s, 0)
            tok = torch.argmax(s) if greedy_l[b] else _draw_row(s, keys[b], tp_l[b], tk_l[b], lse)
            tokens[b] = tok
            logprobs[b] = s[tok] - lse
        return tokens, logprobs
    scaled = x.to(torch.float32) / t[:, None]
    filt = scaled if top_p is None and top_k is None else _filter(scaled, top_p, top_k)
    race = filt - torch.log(_exp_noise(keys[:, None], _codes(x.shape[1], x.device)[None, :]))
    tokens = torch.where(greedy, torch.argmax(x, dim=-1), torch.argmax(race, dim=-1))
    logprobs = torch.log_softmax(scaled, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    return tokens, logprobs


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
