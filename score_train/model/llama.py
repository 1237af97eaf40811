"""The Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5, Qwen3): config checks, RoPE, layers, the
packed (training) and paged (generation) attention paths, and CausalLM, which mixes in the LoRA adapters
(score_train.model.lora) and the Hugging Face export (score_train.model.export)."""
from __future__ import annotations

import contextlib
import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from score_kernels import paged_attention, store_kv
from score_kernels.paged_attention import TorchPlan
from score_train.model.export import ExportMixin
from score_train.model.lora import LoraMixin

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")

try:  # optional: the fastest packed attention on GPUs
    from flash_attn import flash_attn_varlen_func
except Exception:  # noqa: BLE001 - any import failure just means "not installed"
    flash_attn_varlen_func = None


class UnsupportedModelError(ValueError):
    pass


def rope_inv_freq(config) -> tuple[torch.Tensor, float]:
    rp = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None)
    if legacy and not rp.get("rope_type"):
        rp.update(legacy)
    rope_type = rp.get("rope_type", rp.get("type", "default")) or "default"
    theta = rp.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    if rp.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("partial rotary embeddings are not supported")
    dim = head_dim_of(config)
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope_type == "default":
        return inv, 1.0
    if rope_type != "llama3":
        raise UnsupportedModelError(f"RoPE type {rope_type!r} is not supported (default and llama3 are)")
    factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
    old = rp["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
    return torch.where(medium, smoothed, scaled), 1.0


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_supported(config) -> None:
    mt = getattr(config, "model_type", None)
    archs = getattr(config, "architectures", None) or []
    if mt not in SUPPORTED:
        raise UnsupportedModelError(
            f"unsupported architecture: model_type={mt!r} {archs}; supported model types: {', '.join(SUPPORTED)}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{mt}: activation {config.hidden_act!r} is not supported (silu is)")
    if getattr(config, "mlp_bias", False):
        raise UnsupportedModelError(f"{mt}: MLP bias is not supported")
    sliding = getattr(config, "sliding_window", None)
    windowed = mt == "mistral" or getattr(config, "use_sliding_window", False)
    if sliding and windowed and sliding < getattr(config, "max_position_embeddings", 0):
        raise UnsupportedModelError(f"{mt}: sliding-window attention ({sliding}) is not supported")
    rope_inv_freq(config)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dt)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config, qk_norm: bool):
        super().__init__()
        d, self.hq, self.hkv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.dh = head_dim_of(config)
        bias = bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"
        self.q_proj = nn.Linear(d, self.hq * self.dh, bias=bias)
        self.k_proj = nn.Linear(d, self.hkv * self.dh, bias=bias)
        self.v_proj = nn.Linear(d, self.hkv * self.dh, bias=bias)
        self.o_proj = nn.Linear(self.hq * self.dh, d, bias=bool(getattr(config, "attention_bias", False)))
        if qk_norm:
            self.q_norm = RMSNorm(self.dh, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.dh, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def qkv(self, x, cos, sin):
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.hq, self.dh)
        k = self.k_proj(x).view(n, self.hkv, self.dh)
        v = self.v_proj(x).view(n, self.hkv, self.dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, qk_norm=config.model_type == "qwen3")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, attend):
        """attend(q, k, v) -> [n, Hq, D] is the packed (training) or paged (generation) attention. Every path runs
        through this __call__, so module hooks (FSDP2's unshard/reshard, activation checkpointing) see each layer."""
        h = self.input_layernorm(x)
        q, k, v = self.self_attn.qkv(h, cos, sin)
        x = x + self.self_attn.o_proj(attend(q, k, v).reshape(x.shape[0], -1))
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


# ---------------------------------------------------------------------------------------------
# Attention over packed sequences (training forward)

def _packed_attention(q, k, v, cu_seqlens, max_len: int, scale: float):
    """q [N,Hq,D], k/v [N,Hkv,D]; causal within each sequence of cu_seqlens."""
    if flash_attn_varlen_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        cu = cu_seqlens.to(torch.int32)
        return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, softmax_scale=scale, causal=True)
    gqa = q.shape[1] != k.shape[1]
    if q.is_cuda:
        return _flex_attention(q, k, v, cu_seqlens, scale)
    # CPU: one causal SDPA per sequence is the document mask without the wasted cross-document work. The inputs are
    # 4-d [1, H, T, D]: 3-d ones send SDPA to its slower math path (mask, softmax, bmm).
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for s, e in itertools.pairwise(bounds):
        if e > s:
            o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None],
                                               v[s:e].transpose(0, 1)[None], is_causal=True, scale=scale,
                                               enable_gqa=gqa)
            out[s:e] = o[0].transpose(0, 1)
    return out


_FLEX = None


def _flex_attention(q, k, v, cu_seqlens, scale):
    global _FLEX
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=True)
    n = q.shape[0]
    doc = torch.zeros(n, dtype=torch.int32, device=q.device)
    doc[cu_seqlens[1:-1].long()] += 1
    doc = doc.cumsum(0)

    def mask(b, h, qi, ki):
        return (doc[qi] == doc[ki]) & (qi >= ki)

    bm = create_block_mask(mask, None, None, n, n, device=q.device)
    o = _FLEX(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=bm,
              scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return o[0].transpose(0, 1)


# ---------------------------------------------------------------------------------------------
# Paged attention context (generation forward)

class PagedBatch:
    """One engine step's paged-cache metadata, shared by every layer.

    Tokens are packed [N]; sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b+1], the last q_len_b
    positions of its context_lens[b] tokens. Their K/V are stored through slot_mapping before attending
    (score_kernels.paged_attention: Triton on GPUs, its torch backend on CPU, whose gather plan is built
    once here rather than once per layer).
    """

    def __init__(self, slot_mapping, block_tables, context_lens, cu_seqlens_q, block_size: int, scale: float,
                 *, q_lens: list[int] | None = None, ctx_lens: list[int] | None = None):
        self.slot_mapping, self.block_tables = slot_mapping, block_tables
        self.context_lens, self.cu_seqlens_q = context_lens, cu_seqlens_q
        self.scale = scale
        self.plan = None
        if slot_mapping.device.type == "cpu":
            cu = cu_seqlens_q if q_lens is None else [0, *itertools.accumulate(q_lens)]
            self.plan = TorchPlan(block_tables, context_lens if ctx_lens is None else ctx_lens, cu, block_size)

    def attend(self, q, k_cache, v_cache):
        return paged_attention(q, k_cache, v_cache, self.block_tables, self.context_lens, self.cu_seqlens_q,
                               scale=self.scale, plan=self.plan)


# ---------------------------------------------------------------------------------------------

class CausalLM(LoraMixin, ExportMixin, nn.Module):
    """The decoder and its output projection under Hugging Face's parameter names; the LoRA methods come from
    LoraMixin (score_train.model.lora), the export from ExportMixin (score_train.model.export)."""

    def __init__(self, config):
        super().__init__()
        check_supported(config)
        self.config = config
        self.model = Decoder(config)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None if self.tied else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # not a buffer: module.to(bfloat16) would round the frequencies; kept fp32, moved on use
        self.inv_freq, self.rope_scale = rope_inv_freq(config)
        self.head_dim = head_dim_of(config)
        self.scale = self.head_dim ** -0.5

    # -- shapes -------------------------------------------------------------------------------
    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, d] output projection (the embedding when tied) for score_kernels.linear_logprobs."""
        return self.model.embed_tokens.weight if self.tied else self.lm_head.weight

    @property
    def num_layers(self) -> int:
        return len(self.model.layers)

    @property
    def num_kv_heads(self) -> int:
        return self.config.num_key_value_heads

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head_weight)

    def _rope(self, positions, dtype):
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.rope_scale).to(dtype), (emb.sin() * self.rope_scale).to(dtype)

    # -- training forward ---------------------------------------------------------------------
    def forward(self, input_ids, position_ids=None, cu_seqlens=None, *, attention_mask=None, from_layer: int = 0,
                hidden=None, to_layer: int | None = None):
        """Packed: input_ids [N] (+ position_ids [N], cu_seqlens [B+1]) -> hidden [N, d].
        Padded: input_ids [B, T] with attention_mask [B, T] (left or right padding) -> [B, T, d],
        zeros at padding. Hidden states are after the final norm.

        Part of the stack (packed only), for a frozen prefix that runs once and is shared by the policy and its
        reference: `to_layer=k` runs layers [0, k) and returns the residual stream [N, d] (no final norm);
        `from_layer=k, hidden=<that>` runs layers [k:] from it and returns the normed hidden states. Every layer
        still runs through Layer.__call__ (FSDP's hooks, activation checkpointing)."""
        if input_ids.dim() == 2:
            if from_layer or to_layer is not None:
                raise ValueError("from_layer/to_layer need the packed layout (input_ids [N])")
            return self._forward_padded(input_ids, attention_mask, position_ids)
        n_layers = len(self.model.layers)
        stop = n_layers if to_layer is None else to_layer
        if not 0 <= from_layer <= stop <= n_layers:
            raise ValueError(f"need 0 <= from_layer ({from_layer}) <= to_layer ({stop}) <= {n_layers}")
        if (hidden is None) != (from_layer == 0):
            raise ValueError("hidden (the residual stream after layer from_layer - 1) goes with from_layer > 0")
        n = input_ids.shape[0]
        if cu_seqlens is None:
            cu_seqlens = torch.tensor([0, n], device=input_ids.device, dtype=torch.int32)
        if position_ids is None:
            position_ids = _positions_from_cu(cu_seqlens, n)
        max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
        x = self.model.embed_tokens(input_ids) if hidden is None else hidden
        cos, sin = self._rope(position_ids, x.dtype)
        def attend(q, k, v):
            return _packed_attention(q, k, v, cu_seqlens, max_len, self.scale)

        for layer in self.model.layers[from_layer:stop]:
            x = layer(x, cos, sin, attend)
        return x if to_layer is not None else self.model.norm(x)

    def _forward_padded(self, input_ids, attention_mask, position_ids):
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.bool()
        lens = mask.sum(1)
        if position_ids is None:
            position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)
        cu = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
        flat = mask.flatten().nonzero().squeeze(1)
        h = self.forward(input_ids.flatten()[flat], position_ids.flatten()[flat], cu)
        out = h.new_zeros(b * t, h.shape[-1])
        out[flat] = h
        return out.view(b, t, -1)

    # -- generation forward -------------------------------------------------------------------
    def forward_paged(self, input_ids, positions, kv_caches, batch: PagedBatch, *, capture_layer: int = 0):
        """input_ids/positions [N] packed new tokens; kv_caches: per layer (k_cache, v_cache).
        Stores the new tokens' K/V, attends over the cache, returns hidden [N, d] after the final norm.
        capture_layer=k > 0 returns (hidden, residual [N, d] after layers [0, k)): what the trainer's
        `forward(..., to_layer=k)` computes, so a frozen prefix sampled once need not run again."""
        if not 0 <= capture_layer <= self.num_layers:
            raise ValueError(f"capture_layer must be in [0, {self.num_layers}], got {capture_layer}")
        x = self.model.embed_tokens(input_ids)
        cos, sin = self._rope(positions, x.dtype)
        residual = None
        for i, (layer, (kc, vc)) in enumerate(zip(self.model.layers, kv_caches)):
            if i == capture_layer:
                residual = x
            def attend(q, k, v, kc=kc, vc=vc):
                store_kv(k, v, kc, vc, batch.slot_mapping)
                return batch.attend(q, kc, vc)

            x = layer(x, cos, sin, attend)
        if capture_layer == self.num_layers:
            residual = x
        hidden = self.model.norm(x)
        return (hidden, residual) if capture_layer else hidden

    # -- dtype swap ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def weights_as(self, dtype: torch.dtype | None):
        """Every floating parameter and buffer as a `dtype` copy for the duration (a no-op for None or the model's
        own dtype): a bf16 sampler over fp32 master weights. The copies cost one cast per call, not per step, and
        the original tensors (not re-cast values) come back afterwards, so the trained weights never lose bits."""
        if dtype is None or dtype == self.dtype:
            yield self
            return
        held = [t for t in itertools.chain(self.parameters(), self.buffers()) if t.is_floating_point()]
        with torch.inference_mode(False), torch.no_grad():
            saved = [t.data for t in held]
            for t in held:
                t.data = t.data.to(dtype)
        try:
            yield self
        finally:
            with torch.inference_mode(False), torch.no_grad():
                for t, d in zip(held, saved):
                    t.data = d


def _positions_from_cu(cu_seqlens, n):
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lens, output_size=n)
    return torch.arange(n, device=cu.device) - starts
