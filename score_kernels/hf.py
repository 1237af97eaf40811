"""causal_lm_logprobs: next-token log-probs of any Hugging Face causal LM without [B, T, V] logits.

Runs the model's backbone (model.get_decoder(), else model.model), takes its last hidden states,
and calls linear_logprobs against model.get_output_embeddings() (bias included when the head has
one). Alignment: out[:, i] = log p(input_ids[:, i + 1] | input_ids[:, :i + 1]), shape [B, T - 1],
the same as log_softmax(model(input_ids).logits[:, :-1]).gather(-1, input_ids[:, 1:]).
Positions whose next token is padding (attention_mask[:, i + 1] == 0) give 0 with zero gradient.
"""
from __future__ import annotations

import torch

from score_kernels import _checks
from score_kernels.linear_logprobs import linear_logprobs

_IGNORE = -100


def _backbone(model):
    dec = None
    get = getattr(model, "get_decoder", None)
    if callable(get):
        try:
            dec = get()
        except (AttributeError, NotImplementedError, TypeError):
            dec = None
    if dec is None or dec is model:
        dec = getattr(model, "model", None)
    if dec is None:
        raise ValueError("model: no backbone found (model.get_decoder() and model.model are both missing)")
    return dec


def _head(model):
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise ValueError("model: get_output_embeddings() returned no linear head with a weight")
    return head


def _logit_scale(model) -> float:
    # A few families scale logits after the head (e.g. Cohere's logit_scale); fold it into temperature.
    cfg = getattr(model, "config", None)
    scale = getattr(cfg, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale not in (0, 1):
        return float(scale)
    return 1.0


def _vocab_size(model, head) -> int:
    """Rows both the input embedding and the head can index."""
    sizes = [head.weight.shape[0]]
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        sizes.append(emb.weight.shape[0])
    return min(sizes)


def causal_lm_logprobs(model, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None, temperature: float = 1.0,
                       return_entropy: bool = False, backend: str | None = None, validate: bool | None = None):
    """Next-token log-probs [B, T-1] (float32) of input_ids under `model`, and the entropy of each
    next-token distribution with return_entropy=True. Differentiable with respect to the model's
    parameters. Extra logit transforms (final logit soft-capping) are not supported: such models
    raise ValueError. validate: check that every id is in [0, V) (None: CPU tensors only; on a GPU
    the check is a host sync)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, T] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor of token ids, got dtype {input_ids.dtype}")
    if input_ids.shape[1] < 2:
        raise ValueError(f"input_ids needs at least 2 tokens per row, got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                         f"{tuple(input_ids.shape)}")
    cfg = getattr(model, "config", None)
    if getattr(cfg, "final_logit_softcapping", None):
        raise ValueError("model: final_logit_softcapping is not supported by the fused head")
    head = _head(model)
    if _checks.should_validate(validate, input_ids.device) and input_ids.numel():
        V = _vocab_size(model, head)
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"input_ids must lie in [0, {V}) (the model's vocabulary), got ids in [{lo}, {hi}]")
    kwargs = {"input_ids": input_ids, "use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    out = _backbone(model)(**kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    targets = input_ids[:, 1:].long()
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, _IGNORE)
    w = head.weight
    h = hidden[:, :-1]
    if h.dtype != w.dtype:
        h = h.to(w.dtype)
    return linear_logprobs(h, w, targets, getattr(head, "bias", None),
                           temperature=temperature / _logit_scale(model), ignore_index=_IGNORE,
                           return_entropy=return_entropy, backend=backend)
