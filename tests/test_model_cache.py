"""The embedded GGUF is converted once into a plain directory and loaded from it afterwards (slow: loads SmolLM2)."""
import os

import pytest
import torch


@pytest.mark.slow
def test_gguf_loads_through_a_plain_copy(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from score_train.model import hub as M  # GGUF_CACHE is read there

    monkeypatch.setattr(M, "GGUF_CACHE", str(tmp_path / "cache"))
    gguf = M.embedded_gguf_path()
    direct = M.from_hf(AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), dtype=torch.float32,
                                                            gguf_file=os.path.basename(gguf)))
    tok_direct = M.load_tokenizer("embedded")  # parses the GGUF
    cached, tok = M.load_model("embedded")  # writes the plain copy, then loads from it
    (copy_dir,) = [os.path.join(tmp_path / "cache", n) for n in os.listdir(tmp_path / "cache")]
    assert os.path.exists(os.path.join(copy_dir, "complete"))
    with open(os.path.join(copy_dir, "config.json")) as f:
        assert "quantization_config" not in f.read()
    a, b = direct.state_dict(), cached.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    msgs = [{"role": "user", "content": "What is 12 + 30?"}]
    assert (tok_direct.apply_chat_template(msgs, add_generation_prompt=True)
            == tok.apply_chat_template(msgs, add_generation_prompt=True))
    assert tok_direct.eos_token_id == tok.eos_token_id and len(tok_direct) == len(tok)
    ids = torch.tensor(tok("What is 12 + 30? 42")["input_ids"])
    assert torch.equal(direct.logits(direct(ids)), cached.logits(cached(ids)))
    again, _ = M.load_model("embedded", dtype=torch.bfloat16)  # from the copy, in the asked dtype
    assert again.dtype == torch.bfloat16 and len(os.listdir(tmp_path / "cache")) == 1
