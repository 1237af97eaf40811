"""The lean model against Hugging Face's implementations on the same weights (fp32)."""
import os

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from score_train.model import CausalLM, UnsupportedModelError, from_hf, load_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

V = 320


def tiny_configs():
    common = {"vocab_size": V, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2, "rms_norm_eps": 1e-5}
    return {
        "llama3": LlamaConfig(**common, num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        "llama": LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                             rope_theta=500.0),
        "mistral": MistralConfig(**common, num_attention_heads=4, num_key_value_heads=1, sliding_window=None),
        "qwen2": Qwen2Config(**common, num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=False),
        "qwen3": Qwen3Config(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             tie_word_embeddings=True),
    }


def random_hf(config, seed=0):
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:  # biases
                p.normal_(0, 0.3)
    return hf


@pytest.fixture(scope="module", params=list(tiny_configs()))
def pair(request):
    hf = random_hf(tiny_configs()[request.param])
    return hf, from_hf(hf)


def test_logits_equal_hf(pair):
    hf, m = pair
    ids = torch.randint(0, V, (3, 41), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        out = m.logits(m(ids, attention_mask=torch.ones_like(ids)))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)


def test_packed_equals_padded(pair):
    _, m = pair
    g = torch.Generator().manual_seed(2)
    lens = [5, 17, 1, 33]
    seqs = [torch.randint(0, V, (n,), generator=g) for n in lens]
    packed = torch.cat(seqs)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    pos = torch.cat([torch.arange(n) for n in lens])
    with torch.no_grad():
        hp = m(packed, pos, cu)
        T = max(lens)
        for left in (False, True):
            ids = torch.zeros(len(lens), T, dtype=torch.long)
            mask = torch.zeros(len(lens), T, dtype=torch.long)
            for i, s in enumerate(seqs):
                sl = slice(T - len(s), T) if left else slice(0, len(s))
                ids[i, sl], mask[i, sl] = s, 1
            hpad = m(ids, attention_mask=mask)
            torch.testing.assert_close(hpad[mask.bool()], hp, rtol=1e-5, atol=1e-5)
            assert hpad[~mask.bool()].abs().max() == 0
        for s, a in zip(seqs, cu[:-1].tolist()):  # each sequence alone
            torch.testing.assert_close(m(s), hp[a:a + len(s)], rtol=1e-5, atol=1e-5)


def test_gradients_reach_shared_parameters(pair):
    _, m = pair
    ids = torch.randint(0, V, (12,))
    h = m(ids, torch.arange(12), torch.tensor([0, 5, 12], dtype=torch.int32))
    loss = torch.log_softmax(m.logits(h), -1)[:, 0].sum()
    loss.backward()
    assert m.lm_head_weight.grad is not None and m.lm_head_weight.grad.abs().sum() > 0
    assert m.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    m.zero_grad(set_to_none=True)
    if m.tied:
        assert m.lm_head_weight is m.model.embed_tokens.weight


def test_export_round_trip(pair, tmp_path):
    hf, m = pair
    m.save_pretrained(str(tmp_path))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(0, V, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, rtol=0, atol=0)
    m2, _ = None, None
    # and the directory loads back into the lean model
    m2 = from_hf(back)
    with torch.no_grad():
        torch.testing.assert_close(m2(ids[0]), m(ids[0]), rtol=0, atol=0)


def test_to_hf_shares_parameters(pair):
    _, m = pair
    hf = m.to_hf()
    assert hf.model.layers[1].mlp.up_proj.weight.data_ptr() == m.model.layers[1].mlp.up_proj.weight.data_ptr()


def test_unsupported_architecture_named():
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        CausalLM(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32})
    with pytest.raises(UnsupportedModelError, match="yarn"):
        CausalLM(cfg)


def test_load_missing_path():
    with pytest.raises(FileNotFoundError):
        load_model("/nonexistent/model")


@pytest.mark.slow
def test_smollm2_gguf_logits_equal_hf():
    from score_train.model import embedded_gguf_path
    path = embedded_gguf_path()
    m, tok = load_model("embedded")
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("The capital of France is Paris. 2 + 2 = 4, and")])
    with torch.no_grad():
        ref = hf(ids).logits
        out = m.logits(m(ids[0]))[None]
    assert m.config.num_hidden_layers == 30 and m.tied
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
