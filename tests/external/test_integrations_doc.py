"""Runs the recipes of docs/integrations.md verbatim (the ```python block after each `<!-- recipe: NAME -->`
marker) in a namespace holding the objects a recipe names, and checks the result against the peer's own
code path on a tiny random Llama on the CPU."""
import pathlib
import re

import pytest
import torch

from tests.external import _tiny_trl as tiny
from tests.external._peers import need

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "integrations.md"


def recipe(name: str) -> str:
    text = DOC.read_text()
    m = re.search(rf"<!-- recipe: {re.escape(name)} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"docs/integrations.md has no recipe {name!r}"
    return m.group(1)


def test_every_recipe_is_tested():
    names = re.findall(r"<!-- recipe: ([\w-]+) -->", DOC.read_text())
    assert sorted(names) == sorted(["trl", "verl", "verl-kernel", "openrlhf"])


def _tiny_llama(V=97, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float()


def _batch(B=3, T=11, V=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, V, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, :3] = 0  # left padding
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def _param_grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def _verl_torch_backend_oracle(monkeypatch, input_ids, attention_mask, position_ids, temperature):
    """verl's own fused forward (forward_with_torch_backend: FusedLinearForPPO) on an identical model."""
    mp = need("verl.models.transformers.monkey_patch")
    ref = _tiny_llama()
    monkeypatch.setattr(type(ref), "forward", type(ref).forward)  # verl patches the class; restored after
    mp.patch_forward_with_backends(ref, use_fused_kernels=True, fused_kernels_backend="torch")
    out = ref(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, temperature=temperature,
              return_dict=True)
    w = torch.randn(out.log_probs.shape, generator=torch.Generator().manual_seed(7))
    grads = _param_grads(ref, (out.log_probs * w).sum() + (out.entropy * w.flip(0)).sum())
    return out.log_probs.detach(), out.entropy.detach(), grads, w


@pytest.mark.parametrize("name", ["verl", "verl-kernel"])
def test_verl_recipes(name, monkeypatch):
    need("verl.models.transformers.dense_common")
    input_ids, attention_mask, position_ids = _batch()
    temperature = 0.8
    lp_t, ent_t, grads_t, w = _verl_torch_backend_oracle(monkeypatch, input_ids, attention_mask, position_ids,
                                                         temperature)
    model = _tiny_llama()
    if name == "verl-kernel":  # the recipe rebinds verl's kernel module attribute: undo it after the test
        lce = need("verl.utils.kernel.linear_cross_entropy")
        monkeypatch.setattr(lce, "linear_cross_entropy", lce.linear_cross_entropy)
    ns = dict(model=model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
              temperature=temperature)
    exec(recipe(name), ns)
    log_probs, entropy = ns["log_probs"], ns["entropy"]
    if name == "verl-kernel":
        assert log_probs.shape == (input_ids.numel(),)  # verl's Triton kernel returns flattened tokens
        log_probs, entropy = log_probs.view(input_ids.shape), entropy.view(input_ids.shape)
    assert log_probs.dtype == torch.float32
    torch.testing.assert_close(log_probs, lp_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, ent_t.float(), rtol=1e-5, atol=1e-5)
    grads = _param_grads(model, (log_probs * w).sum() + (entropy * w.flip(0)).sum())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for n, g, gt in zip(names, grads, grads_t):
        torch.testing.assert_close(g, gt, rtol=1e-4, atol=1e-5, msg=n)


def test_openrlhf_recipe():
    from tests.external.test_openrlhf_oracle import _load_openrlhf_utils

    orl = _load_openrlhf_utils()
    model = _tiny_llama()
    sequences, attention_mask, _ = _batch(B=4, T=13)
    temperature = 0.9
    action_mask = torch.ones(4, 5, dtype=torch.bool)
    action_mask[2, 3:] = False
    base_action_log_probs = -torch.rand(4, 5)
    ns = dict(model=model, sequences=sequences, attention_mask=attention_mask, temperature=temperature,
              action_mask=action_mask, base_action_log_probs=base_action_log_probs)
    exec(recipe("openrlhf"), ns)

    # OpenRLHF's Actor.forward, non-packed: fp32 logits / temperature -> log_probs_from_logits(rolled)[:, :-1]
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    logits = model(sequences, attention_mask=attention_mask, position_ids=position_ids).logits.float()
    logits = logits / temperature
    theirs = orl.log_probs_from_logits(logits, torch.roll(sequences, shifts=-1, dims=1))[:, :-1]
    theirs = theirs[:, -action_mask.shape[1]:] * action_mask.float()
    torch.testing.assert_close(ns["action_log_probs"], theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ns["kl"], orl.compute_approx_kl(theirs, base_action_log_probs, kl_estimator="k3"),
                               rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(ns["kl"].sum(), model.lm_head.weight)
    (gt,) = torch.autograd.grad(orl.compute_approx_kl(theirs, base_action_log_probs, kl_estimator="k3").sum(),
                                model.lm_head.weight)
    torch.testing.assert_close(g, gt, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_trl_recipe(tmp_path, monkeypatch):
    trl = need("trl")
    need("datasets")
    from transformers import LlamaForCausalLM

    import score_kernels.integrations as integ

    V = 257
    model = LlamaForCausalLM.from_pretrained(tiny.save_tiny_llama(tmp_path / "m", V))
    args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=8, max_steps=1, logging_steps=1, report_to="none", use_cpu=True,
                          seed=0, beta=0.04, save_strategy="no", disable_tqdm=True)
    calls = []
    real = integ.linear_logprobs
    monkeypatch.setattr(integ, "linear_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    ns = dict(model=model, reward_fn=tiny.reward_even_words, args=args, dataset=tiny.prompts(8),
              tokenizer=tiny.word_tokenizer(V))
    exec(recipe("trl"), ns)
    trainer = ns["trainer"]
    assert len(calls) >= 2  # the policy's and the reference model's log-probs went through our head
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 1 and torch.isfinite(torch.tensor(logs[0]["loss"]))
