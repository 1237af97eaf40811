"""Hugging Face export of the lean model: `ExportMixin` gives CausalLM plain_state_dict / plain_config / to_hf /
save_pretrained. Parameter names equal Hugging Face's, so the export is a plain state-dict copy (LoRA adapters
merged in)."""
from __future__ import annotations

import copy

import torch

from score_train.model.lora import lora_layers


class ExportMixin:
    """Export methods of CausalLM (needs its config, model, tied, inv_freq, rope_scale, device and has_lora)."""

    def plain_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters under Hugging Face's names: the model's own tensors, or with LoRA the base weights with
        the adapters merged in (new tensors: W + B A * alpha / rank) and no adapter entries."""
        sd = dict(self.state_dict())
        if not self.has_lora:
            return sd
        out = {k: v for k, v in sd.items() if ".lora_" not in k and ".base_layer." not in k}
        with torch.no_grad():
            for name, m in lora_layers(self):
                base = m.get_base_layer()
                out[f"{name}.weight"] = base.weight + m.get_delta_weight("default").to(base.weight.dtype)
                if base.bias is not None:
                    out[f"{name}.bias"] = base.bias
        return out

    def plain_config(self):
        """A copy of the config for a plain model in the parameters' dtype: a model loaded from GGUF
        carries quantization_config {quant_method: gguf}, which would make transformers treat the
        export as quantized (Trainer refuses to fine-tune it, save_pretrained of the reload raises)."""
        cfg = copy.deepcopy(self.config)
        for k in ("quantization_config", "_pre_quantization_dtype"):
            if k in cfg.__dict__:
                delattr(cfg, k)
        cfg.dtype = self.model.embed_tokens.weight.dtype
        return cfg

    def to_hf(self):
        """A plain transformers *ForCausalLM (clean config, see plain_config) that shares this
        model's parameters (no copy; with LoRA, merged copies of the adapted weights)."""
        # local: transformers takes seconds to import and only the export needs it here
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
