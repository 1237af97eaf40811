"""sample: batch-invariant token sampling with temperature, top-p, top-k and per-row seeds.

Each row draws with the Gumbel-max trick (an exponential race): token = argmax(logits / T - log E[v])
over the tokens that survive top-k/top-p, where E[v] = -log(u[v]) ~ Exponential(1) and u[v] is a
counter-based hash (murmur3 fmix32) of (seed, position, v). Nothing depends on the batch the row sits
in, on other rows, or on a global RNG: the same (seed, position, logits) always gives the same token,
alone or in any batch, on a given device. CPU and GPU may differ on near-ties (their log() differs in
the last bit).

Paths: CPU tensors run row by row in PyTorch; CUDA tensors without top-p/top-k run one fused Triton
pass per row (online log-sum-exp + race); CUDA tensors with top-p/top-k run batched PyTorch.

The returned log-prob is that of the temperature-scaled distribution *before* truncation,
log_softmax(logits / T)[token] (what a trainer recomputes with temperature T); greedy rows (T == 0)
return log_softmax(logits)[token].
"""
from __future__ import annotations

import torch

from score_kernels import _aot, _checks
from score_kernels._backend import INTERPRET, has_triton
from score_kernels._triton_utils import HAVE_TRITON, tl, triton

_M32 = 0xFFFFFFFF
_C1, _C2 = 0x85EBCA6B - (1 << 32), 0xC2B2AE35 - (1 << 32)  # murmur3 fmix32 constants as int32
# A uniform u = (k + 0.5) / 2**23 lies in [2**-24, 1 - 2**-24] (both exact in fp32), so the Gumbel noise
# -log(-log(u)) lies in [-2.82, 16.64]: a token whose scaled logit is more than 19.45 below its row's best can never
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


def _uniform(key: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """u = (k + 0.5) / 2**23 with k the top 23 bits of fmix32(key ^ code), in int32 arithmetic (products
    wrap; arithmetic shifts are masked into logical ones). A pure function of (key, code) per element."""
    x = key ^ code
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _C1
    x = x ^ ((x >> 13) & 0x7FFFF)
    x = x * _C2
    x = x ^ ((x >> 16) & 0xFFFF)
    return (((x >> 9) & 0x7FFFFF).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def _exp_noise(key: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Exponential(1) variates E = -log(u)."""
    return -torch.log(_uniform(key, code))


def uniforms(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """u[b, v] in (0, 1), the uniforms behind the draws (for tests)."""
    return _uniform(row_keys(seeds, positions)[:, None], _codes(vocab, seeds.device)[None, :])


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


# ----------------------------------------------------------------------------- triton
if HAVE_TRITON:

    @triton.jit
    def _sample_kernel(logits_ptr, stride_row, temp_ptr, key_ptr, tok_ptr, lp_ptr, vocab,
                       BLOCK: tl.constexpr):
        """One program per row: online log-sum-exp of logits / T and the exponential race, one pass."""
        row = tl.program_id(0)
        t = tl.load(temp_ptr + row).to(tl.float32)
        greedy = t <= 0.0
        t = tl.where(greedy, 1.0, t)
        key = tl.load(key_ptr + row)
        base = logits_ptr + row.to(tl.int64) * stride_row
        # per-lane running state, reduced across lanes once at the end (no cross-warp work per chunk)
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        ssum = tl.zeros([BLOCK], tl.float32)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        best_idx = tl.zeros([BLOCK], tl.int32)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < vocab
            x = tl.load(base + cols, mask=ok, other=float("-inf")).to(tl.float32) / t
            # online sum of exp per lane with one exp: rescale the sum when x is the lane's new max
            up = x > m
            e = tl.exp(tl.where(up, m - x, x - m))
            e = tl.where(x == float("-inf"), 0.0, e)
            ssum = tl.where(up, ssum * e + 1.0, ssum + e)
            m = tl.maximum(m, x)
            h = key ^ (cols * -1640531535)  # cols * 0x9E3779B1 mod 2**32, as in _vocab_code
            h = h ^ ((h >> 16) & 0xFFFF)
            h = h * -2048144789
            h = h ^ ((h >> 13) & 0x7FFFF)
            h = h * -1028477387
            h = h ^ ((h >> 16) & 0xFFFF)
            k = (h >> 9) & 0x7FFFFF
            u = (k.to(tl.float32) + 0.5) * (1.0 / 8388608.0)
            w = ((0x7FFFFF - k).to(tl.float32) + 0.5) * (1.0 / 8388608.0)  # 1 - u, exact
            # -log(u) near u = 1 by its series in w = 1 - u: a fast log() would round it to 0 there
            en = tl.where(w < 0.01, w + w * w * (0.5 + w * (1.0 / 3.0 + w * 0.25)), -tl.log(u))
            r = tl.where(greedy, x, x - tl.log(en))
            r = tl.where(ok, r, float("-inf"))
            take = r > best  # strict: a lane keeps its first maximum
            best_idx = tl.where(take, cols, best_idx)
            best = tl.where(take, r, best)
        top = tl.max(best, 0)
        tok = tl.min(tl.where(best == top, best_idx, vocab), 0)  # the first maximum overall, as torch.argmax
        mx = tl.max(m, 0)
        lse = mx + tl.log(tl.sum(tl.where(m == float("-inf"), 0.0, ssum * tl.exp(m - mx)), 0))
        xt = tl.load(base + tok).to(tl.float32) / t
        tl.store(tok_ptr + row, tok.to(tl.int64))
        tl.store(lp_ptr + row, xt - lse)

    for _dt in ("bf16", "fp32"):
        _aot.register(f"sample[{_dt}]", _sample_kernel,
                      {"logits_ptr": f"*{_dt}", "stride_row": "i32", "temp_ptr": "*fp32", "key_ptr": "*i32",
                       "tok_ptr": "*i64", "lp_ptr": "*fp32", "vocab": "i32", "BLOCK": "constexpr"},
                      {"BLOCK": 2048}, num_warps=8)


def _sample_triton(logits, temperature, seeds, positions, block: int | None = None):
    """The fused GPU path (no top-p/top-k); also runs under the Triton interpreter on CPU tensors."""
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    bsz, vocab = x.shape
    tokens = torch.empty(bsz, dtype=torch.int64, device=x.device)
    logprobs = torch.empty(bsz, dtype=torch.float32, device=x.device)
    if bsz:
        keys = row_keys(seeds, positions).contiguous()
        block = block or (256 if INTERPRET else 2048)
        _sample_kernel[(bsz,)](x, x.stride(0), temperature.to(torch.float32).contiguous(), keys, tokens, logprobs,
                               vocab, BLOCK=block, num_warps=8)
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
    if logits.is_cuda and top_p is None and top_k is None and has_triton():
        return _sample_triton(logits, temperature, seeds, positions)
    return sample_reference(logits, temperature, top_p, top_k, seeds, positions)
