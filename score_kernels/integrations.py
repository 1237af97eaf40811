"""Drop-in adapters: score_kernels ops behind the exact signatures and semantics of the functions they
replace in other RL trainers. No peer package is imported at module import; the TRL and verl patches import
the one output class they must return when they are called.

TRL (trl 1.16):
    selective_log_softmax(logits, index, temperature=1.0, row_mask=None)   trl.trainer.utils
    entropy_from_logits(logits, chunk_size=128)                             trl.trainer.utils
    add_fused_lm_head(model, temperature=1.0, outputs=("log_probs",))       trl.trainer.utils, with
        linear_logprobs as the head: `model(..., labels=..., fused_lm_head=True)` returns a
        FusedCausalLMOutput (log_probs, entropy) without [B, T, V] logits
    patch_grpo_trainer(trainer)                                             the one call for GRPOTrainer
verl (verl 0.9.1):
    linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none")
                                                                            verl.utils.kernel.linear_cross_entropy
    patch_verl_model(model)    the model forward verl's actor calls with use_fused_kernels
                               (returns CausalLMOutputForPPO(log_probs, entropy))
OpenRLHF (openrlhf 0.11):
    compute_approx_kl(log_probs, log_probs_base, log_probs_old=None, kl_estimator="k1",
                      unbiased_gradient=False)                              openrlhf.models.utils
    log_probs_from_logits(logits, labels, temperature=1.0)                  openrlhf.models.utils

Recipes: docs/integrations.md (its code blocks are run by tests/external/test_integrations_doc.py).
"""
from __future__ import annotations

import types

import torch

from score_kernels.linear_logprobs import linear_logprobs
from score_kernels.logits_logprobs import logprobs_from_logits
from score_kernels.token_kl import token_kl

_IGNORE = -100


# ----------------------------------------------------------------------------- TRL
def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0,
                          row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """trl.trainer.utils.selective_log_softmax for one index per row (index shaped logits[..., 0]).
    Rows where row_mask is 0 give 0 with zero gradient. Returns float32 (TRL returns the logits' dtype:
    ours accumulates in fp32 and keeps it)."""
    if index.dim() != logits.dim() - 1:
        raise ValueError(f"index must have shape logits.shape[:-1] (one target per row), got {tuple(index.shape)} "
                         f"for logits {tuple(logits.shape)}")
    if row_mask is not None:
        index = index.masked_fill(row_mask == 0, _IGNORE)
    return logprobs_from_logits(logits, index, temperature=temperature, ignore_index=_IGNORE)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """trl.trainer.utils.entropy_from_logits: entropy (nats) over the last axis, float32. chunk_size is
    accepted for the signature; ours is one online pass per row and needs no chunking."""
    del chunk_size
    index = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return logprobs_from_logits(logits, index, return_entropy=True)[1]


def _logit_scale(config) -> float:
    """The multiplier HF applies to the head's output (TRL's add_fused_lm_head reads the same fields)."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        v = getattr(config, name, None)
        if v is not None:
            return float(v)
    if getattr(config, "logits_scaling", None) is not None:
        s = float(config.logits_scaling)
        return s if getattr(config, "model_type", None) == "hyperclovax" else 1.0 / s
    return 1.0


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _fused_head(model, hidden: torch.Tensor, labels: torch.Tensor, temperature: float, entropy: bool):
    cfg = _text_config(model)
    if getattr(cfg, "final_logit_softcapping", None):
        raise ValueError("model: final_logit_softcapping is not supported by linear_logprobs")
    head = model.get_output_embeddings()
    w = head.weight
    if hidden.dtype != w.dtype:
        hidden = hidden.to(w.dtype)
    return linear_logprobs(hidden, w, labels.to(w.device), getattr(head, "bias", None),
                           temperature=temperature / _logit_scale(cfg), ignore_index=_IGNORE,
                           return_entropy=entropy)


def _backbone(model):
    return getattr(model, model.base_model_prefix, None) or model.get_decoder()


def add_fused_lm_head(model, temperature: float = 1.0, outputs: tuple[str, ...] = ("log_probs",),
                      cast_lm_head_to_fp32: bool = False) -> None:
    """trl.trainer.utils.add_fused_lm_head with linear_logprobs as the head: afterwards
    `model(..., labels=labels, fused_lm_head=True)` returns TRL's FusedCausalLMOutput with log_probs (and
    entropy when asked) of each next-token label, zero where the label is -100, and loss = -sum(log_probs) /
    (label count or num_items_in_batch). Without fused_lm_head the previous forward runs (generation is
    unchanged). Patches the instance only. cast_lm_head_to_fp32 is accepted for TRL's signature: ours
    accumulates in fp32 whatever the input dtype."""
    del cast_lm_head_to_fp32
    from trl.trainer.utils import FusedCausalLMOutput

    unsupported = set(outputs) - {"log_probs", "entropy"}
    if unsupported:
        raise ValueError(f"outputs: only 'log_probs' and 'entropy' are computed by linear_logprobs, got "
                         f"{sorted(unsupported)}")
    want_entropy = "entropy" in outputs
    previous = model.forward

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head:
            for name, v in (("labels", labels), ("shift_labels", shift_labels),
                            ("num_items_in_batch", num_items_in_batch)):
                if v is not None:
                    kwargs[name] = v
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = _backbone(self)(*args, **kwargs).last_hidden_state
        if shift_labels is None:  # position t predicts token t + 1
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels != _IGNORE
        out = _fused_head(self, hidden, labels, temperature, want_entropy)
        log_probs, ent = out if want_entropy else (out, None)
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / denom, log_probs=log_probs, entropy=ent,
                                   label_mask=mask)

    model.forward = types.MethodType(forward, model)


def patch_grpo_trainer(trainer) -> None:
    """Make a constructed trl.GRPOTrainer compute its per-token log-probs and entropies (policy, old and
    reference) with linear_logprobs from the backbone's hidden states. Call once, before trainer.train()."""
    model = trainer.model
    if hasattr(model, "get_base_model"):  # PEFT: the head lives on the base model
        model = model.get_base_model()
    add_fused_lm_head(model, temperature=trainer.temperature, outputs=("log_probs", "entropy"))
    if getattr(trainer, "ref_model", None) is not None:
        add_fused_lm_head(trainer.ref_model, temperature=trainer.temperature)


# ----------------------------------------------------------------------------- verl
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         temperature: float = 1.0, reduction: str = "none", dist_process_group=None):
    """verl.utils.kernel.linear_cross_entropy: (log_probs, entropy) of labels under
    softmax(hidden @ weight.T / temperature), both float32 and flattened to [tokens] as verl's returns them.
    Only reduction="none" and no vocabulary-parallel process group."""
    if reduction != "none":
        raise ValueError(f"reduction: only 'none' is supported, got {reduction!r}")
    if dist_process_group is not None:
        raise ValueError("dist_process_group: a vocabulary-parallel head is not supported")
    h = hidden.reshape(-1, hidden.shape[-1])
    return linear_logprobs(h, weight, labels.reshape(-1), temperature=float(temperature), return_entropy=True)


def _verl_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                  inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                  output_hidden_states=None, return_dict=None, cache_position=None, logits_to_keep=0,
                  temperature: float = 1.0, shift_labels=None, **loss_kwargs):
    """verl's forward_with_{torch,triton}_backend contract: log_probs and entropy [B, T] of the next token
    (labels rolled left by one, or shift_labels as given), from hidden states."""
    from verl.models.transformers.dense_common import CausalLMOutputForPPO

    out = _backbone(self)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                          output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                          cache_position=cache_position)
    if shift_labels is not None:
        rolled = shift_labels
    elif labels is not None:
        rolled = torch.roll(labels, shifts=-1, dims=-1)
    elif input_ids is not None:
        rolled = torch.roll(input_ids, shifts=-1, dims=-1)
    else:
        raise ValueError("input_ids or labels must be given")
    log_probs, entropy = _fused_head(self, out.last_hidden_state, rolled, float(temperature), True)
    return CausalLMOutputForPPO(log_probs=log_probs, entropy=entropy, past_key_values=out.past_key_values,
                                hidden_states=out.hidden_states, attentions=out.attentions)


def patch_verl_model(model) -> None:
    """Install linear_logprobs as the fused forward verl calls when actor_rollout_ref.model.use_fused_kernels
    is on (in place of verl.models.transformers.monkey_patch.patch_forward_with_backends' forward): the
    instance's forward returns CausalLMOutputForPPO(log_probs, entropy) and never builds logits."""
    model.forward = types.MethodType(_verl_forward, model)


# ----------------------------------------------------------------------------- OpenRLHF
def compute_approx_kl(log_probs: torch.Tensor, log_probs_base: torch.Tensor,
                      log_probs_old: torch.Tensor | None = None, kl_estimator: str = "k1",
                      unbiased_gradient: bool = False) -> torch.Tensor:
    """openrlhf.models.utils.compute_approx_kl with its semantics: the estimate clamped to [-10, 10]; with
    unbiased_gradient the value is kept and the gradient is w * (log_probs - log_probs_base),
    w = min(exp(log_probs - log_probs_old), 10) detached (1 without log_probs_old)."""
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"kl_estimator must be 'k1', 'k2' or 'k3', got {kl_estimator!r}")
    value = token_kl(log_probs, log_probs_base, kl_estimator).clamp(-10.0, 10.0)
    if not unbiased_gradient:
        return value
    w = 1.0 if log_probs_old is None else (log_probs.float() - log_probs_old.float()).exp().clamp(max=10.0).detach()
    surrogate = w * token_kl(log_probs, log_probs_base, "k2")
    return value.detach() + surrogate - surrogate.detach()


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """openrlhf.models.utils.log_probs_from_logits, float32, without dividing the logits in place."""
    return logprobs_from_logits(logits, labels, temperature=temperature)
