"""causal_lm_logprobs on a tiny random LlamaForCausalLM (no hub access) against the HF logits."""
import pytest
import torch

from score_kernels import causal_lm_logprobs

transformers = pytest.importorskip("transformers")


def _model(tied=True, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg).eval()


def _hf_logprobs(model, ids, mask=None, temperature=1.0):
    logits = model(input_ids=ids, attention_mask=mask).logits.double()
    lsm = torch.log_softmax(logits[:, :-1] / temperature, -1)
    lp = lsm.gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    if mask is not None:
        keep = mask[:, 1:].bool()
        lp, ent = lp * keep, ent * keep
    return lp, ent


@pytest.mark.parametrize("tied", [True, False])
def test_matches_hf_logits(tied):
    model = _model(tied)
    ids = torch.randint(0, 97, (3, 11))
    lp, ent = causal_lm_logprobs(model, ids, temperature=0.8, return_entropy=True)
    assert lp.shape == (3, 10) and lp.dtype == torch.float32
    r_lp, r_ent = _hf_logprobs(model, ids, temperature=0.8)
    torch.testing.assert_close(lp.double(), r_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), r_ent, rtol=1e-5, atol=1e-5)


def test_padding_and_gradients():
    model = _model()
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    lp = causal_lm_logprobs(model, ids, attention_mask=mask)
    assert (lp[1, 5:] == 0).all()
    lp.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    r_lp, _ = _hf_logprobs(model, ids, mask)
    torch.testing.assert_close(lp.detach().double(), r_lp.detach(), rtol=1e-5, atol=1e-5)
    r_lp.sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n].double(), p.grad.double(), rtol=1e-4, atol=1e-5, msg=n)


def test_position_ids_and_bad_input():
    model = _model()
    ids = torch.randint(0, 97, (2, 7))
    pos = torch.arange(7).expand(2, 7)
    lp = causal_lm_logprobs(model, ids, position_ids=pos)
    torch.testing.assert_close(lp, causal_lm_logprobs(model, ids))
    with pytest.raises(ValueError, match="input_ids"):
        causal_lm_logprobs(model, ids[:, :1])
    with pytest.raises(ValueError, match="attention_mask"):
        causal_lm_logprobs(model, ids, attention_mask=torch.ones(2, 6))


@pytest.mark.parametrize("bad", ["float", "bool", "too_big", "negative"])
def test_bad_ids_raise_value_error_naming_input_ids(bad):
    model = _model()
    ids = torch.randint(0, 97, (2, 7))
    ids = {"float": ids.float(), "bool": ids > 50, "too_big": ids.index_fill(1, torch.tensor([3]), 97),
           "negative": ids.index_fill(1, torch.tensor([0]), -1)}[bad]
    with pytest.raises(ValueError, match="input_ids"):
        causal_lm_logprobs(model, ids)
