"""The HF export is a plain model: no quantization_config (a GGUF load carries one), safetensors in
the trained dtype, fine-tunable with transformers.Trainer, and a save / load round trip keeps logits."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from score_train.model import from_hf  # noqa: E402


def _tiny_gguf_like(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    hf = transformers.LlamaForCausalLM(cfg)
    # what a GGUF load leaves in the config
    hf.config.quantization_config = {"quant_method": "gguf"}
    return from_hf(hf, dtype=dtype)


def _config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def _trainer(model, out_dir, vocab):
    class Tiny(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            ids = torch.arange(6) % vocab + i
            return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    args = transformers.TrainingArguments(output_dir=str(out_dir), max_steps=1, per_device_train_batch_size=2,
                                          report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                                          learning_rate=1e-3)
    return transformers.Trainer(model=model, args=args, train_dataset=Tiny())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_is_plain_and_trainable(tmp_path, dtype):
    m = _tiny_gguf_like(dtype)
    assert "quantization_config" in m.config.to_dict()  # the case the export must clean
    m.save_pretrained(str(tmp_path / "a"))
    cfg = _config(tmp_path / "a")
    assert "quantization_config" not in cfg and cfg["dtype"] == str(dtype).split(".")[1]
    assert os.path.exists(tmp_path / "a" / "model.safetensors")
    assert "quantization_config" in m.config.to_dict()  # the live model's config is untouched
    re = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "a"), dtype=dtype)
    assert re.dtype == dtype and not getattr(re, "is_quantized", False)
    before = {n: p.detach().clone() for n, p in re.named_parameters()}
    trainer = _trainer(re, tmp_path / "run", 61)  # a quantized model is refused here
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in re.named_parameters())  # one real step
    # round trip of the fine-tuned model: save, load, identical logits
    re.save_pretrained(str(tmp_path / "b"))
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "b"), dtype=dtype)
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(ids).logits, re.eval()(ids).logits, rtol=0, atol=0)


def test_export_logits_equal_ours(tmp_path):
    m = _tiny_gguf_like()
    m.save_pretrained(str(tmp_path))
    re = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    with torch.no_grad():
        torch.testing.assert_close(re(ids[None]).logits[0], m.logits(m(ids)), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_embedded_gguf_export_is_plain(tmp_path):
    # straight from the GGUF (load_model now reads a plain cached copy): the config that needs cleaning
    from score_train.model import embedded_gguf_path, load_tokenizer
    gguf = embedded_gguf_path()
    m = from_hf(transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), dtype=torch.float32,
                                                                  gguf_file=os.path.basename(gguf)))
    tok = load_tokenizer("embedded")
    assert "quantization_config" in m.config.to_dict()
    m.save_pretrained(str(tmp_path / "a"), tokenizer=tok)
    cfg = _config(tmp_path / "a")
    assert "quantization_config" not in cfg and cfg["dtype"] == "float32"
    re = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "a"), dtype=torch.float32).eval()
    _trainer(re, tmp_path / "run", 100)  # constructs: not refused as "purely quantized"
    ids = torch.tensor(tok.encode("The capital of France is"))
    with torch.no_grad():
        ours = m.logits(m(ids))
        theirs = re(ids[None]).logits[0]
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
        re.save_pretrained(str(tmp_path / "b"))  # raised for the old export's reload
        again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "b"), dtype=torch.float32).eval()
        torch.testing.assert_close(again(ids[None]).logits, theirs[None], rtol=0, atol=0)
