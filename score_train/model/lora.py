"""LoRA adapters (peft) on the lean model: `LoraMixin` gives CausalLM add_lora / adapters_off / adapters_merged /
save_lora_adapter; `BaseView` is the base model inside a LoRA model, the trainer's frozen reference."""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

# every linear projection of a decoder layer: what LoRA adapts (the embedding / lm_head and the norms stay frozen)
LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj")


def lora_layers(model) -> list:
    """(name, module) of every peft LoRA layer in the model."""
    from peft.tuners.lora import LoraLayer  # local: peft is optional (the lora extra)

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


class LoraMixin:
    """LoRA methods of CausalLM (needs its num_layers and nn.Module's parameters / named_modules)."""

    def add_lora(self, rank: int, alpha: float, from_layer: int = 0) -> int:
        """Inject peft LoRA adapters of `rank` (scale alpha / rank) into every linear projection of layers
        [from_layer:] and freeze everything else. Returns the number of adapter parameters. No dropout: the
        sampler and the trainer must compute the same distribution. B starts at zero, so the model starts as
        the base; layers below from_layer stay the base's, so a frozen prefix is still shared with the reference."""
        if importlib.util.find_spec("peft") is None:
            raise ImportError("model.lora_rank > 0 needs peft: pip install 'score-rl[lora]'")
        from peft import LoraConfig, inject_adapter_in_model  # local: peft is optional (the lora extra)

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

    @contextlib.contextmanager
    def adapters_off(self):
        """The base model for the duration (a no-op without adapters). peft's enable_adapters also clears and
        restores the adapters' requires_grad; use it under no_grad, between a forward and its backward at most."""
        layers = [m for _, m in lora_layers(self)] if self.has_lora else []
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
        then runs one matmul per projection instead of three, which pays on larger batches and GPUs, where the two
        small matmuls are separate launches (benchmarks/results/lora_rollout_speed.json). The base weights are
        restored bit for bit afterwards, not by subtraction, so the reference never drifts."""
        layers = [m for _, m in lora_layers(self)] if self.has_lora else []
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

    def save_lora_adapter(self, path: str) -> None:
        """Write the adapters as a peft adapter directory (adapter_config.json + adapter_model.safetensors) that
        `peft.PeftModel.from_pretrained(<the base as a transformers model>, path)` loads: the module names are
        Hugging Face's."""
        from peft import get_peft_model_state_dict  # local: peft is optional (the lora extra)
        from safetensors.torch import save_file

        if not self.has_lora:
            raise ValueError("save_lora_adapter: the model has no LoRA adapters")
        os.makedirs(path, exist_ok=True)
        sd = get_peft_model_state_dict(self)
        save_file({f"base_model.model.{k}": v.detach().contiguous().cpu() for k, v in sd.items()},
                  os.path.join(path, "adapter_model.safetensors"))
        self.lora_config.save_pretrained(path)


class BaseView:
    """The base model inside a LoRA model, as the trainer's frozen reference: each call runs the policy's own
    modules with the adapters switched off (no copy of the weights; the lm_head is never adapted). model: a
    CausalLM with adapters."""

    def __init__(self, model):
        if not model.has_lora:
            raise ValueError("BaseView needs a model with LoRA adapters (else the reference is a frozen copy)")
        self.model = model

    def __call__(self, *args, **kwargs):
        with self.model.adapters_off():
            return self.model(*args, **kwargs)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.lm_head_weight
