"""A lean decoder for the Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5, Qwen3).

One set of plain `nn.Parameter`s serves both training and generation:
- `model(input_ids [N], position_ids [N], cu_seqlens [B+1]) -> hidden [N, d]` on packed sequences
  (or `model(input_ids [B, T], attention_mask=[B, T]) -> [B, T, d]`), after the final norm;
  log-probs come from `score_kernels.linear_logprobs(hidden, model.lm_head_weight, ...)`.
- `model.forward_paged(...)` is the engine's forward over a paged KV cache.

Parameter names equal Hugging Face's, so loading and exporting is a plain state-dict copy.
`model.add_lora(...)` trains peft LoRA adapters instead of the weights; `adapters_off()` is then the base model
(the KL reference, no copy), and the export merges the adapters (`plain_state_dict`).

Modules: `llama` (the architecture and CausalLM), `lora` (adapters, BaseView), `export` (to Hugging Face),
`hub` (loading a directory, a GGUF file or the embedded model).
"""
from score_train.model.hub import embedded_gguf_path, from_hf, load_model, load_tokenizer
from score_train.model.llama import CausalLM, PagedBatch, UnsupportedModelError
from score_train.model.lora import BaseView

__all__ = ["BaseView", "CausalLM", "PagedBatch", "UnsupportedModelError", "embedded_gguf_path", "from_hf",
           "load_model", "load_tokenizer"]
