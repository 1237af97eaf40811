import pytest
import torch

from score_train import algos, packing
from score_train.config import AlgoConfig
from score_train.rollout.types import Episode


def _sample(pi, si, p, y1, ins, y2):
    return Episode(prompt_index=pi, sample_index=si, prompt_ids=p, turn1_ids=y1,
                         turn1_logprobs=[-0.5] * len(y1), turn1_text="", finish_reasons=["eos", "eos"],
                         instruction_ids=ins, turn2_ids=y2, turn2_logprobs=None if y2 is None else [-0.25] * len(y2), turn2_text="")


def test_schedule_and_stage_settings():
    a = AlgoConfig(name="score", stage1_steps=3, stage2_steps=2, beta1=0.01, beta2=0.1, alpha=10)
    assert algos.schedule(a) == [("stage1", 3), ("stage2", 2)]
    assert [algos.stage_at(a, s) for s in range(5)] == ["stage1"] * 3 + ["stage2"] * 2
    s1, s2 = algos.stage_settings(a, "stage1"), algos.stage_settings(a, "stage2")
    assert s1.pg_turns == (False, True) and s1.kl_coef == (0.1, 0.01) and s1.shaping_alpha == 0
    assert s2.pg_turns == (True, True) and s2.kl_coef == (0.01, 0.01) and s2.shaping_alpha == 10
    a.interleave = 2
    assert algos.schedule(a) == [("stage1", 2), ("stage2", 1), ("stage1", 1), ("stage2", 1)]
    assert algos.total_steps(a) == 5
    m = algos.stage_settings(AlgoConfig(name="multi-turn-rl"), "multi-turn-rl")
    assert m.pg_turns == (True, True) and m.shaping_alpha == 0
    st = algos.stage_settings(AlgoConfig(name="single-turn-rl"), "single-turn-rl")
    assert not st.two_turn and st.num_turns == 1
    assert algos.schedule(AlgoConfig(name="self-refine")) == []


def test_pack_samples_layout():
    s0 = _sample(0, 0, [1, 2], [3, 4], [5], [6, 7])
    s1 = _sample(0, 1, [1, 2], [8], [5, 9], [10])
    b = packing.pack_samples([s0, s1], rows=[4, 5])
    # [N] = 7 + 6 tokens
    assert b.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 1, 2, 8, 5, 9, 10]
    assert b.cu_seqlens.tolist() == [0, 7, 13]
    assert b.position_ids.tolist() == list(range(7)) + list(range(6))
    # position i is scored on token i+1: turn of the *next* token
    assert b.turn_ids.tolist() == [-1, 0, 0, -1, 1, 1, -1, -1, 0, -1, -1, 1, -1]
    assert b.targets.tolist() == [-100, 3, 4, -100, 6, 7, -100, -100, 8, -100, -100, 10, -100]
    assert b.seq_ids.tolist() == [4] * 7 + [5] * 6
    assert b.old_logprobs[1].item() == -0.5 and b.old_logprobs[4].item() == -0.25
    assert b.num_policy_tokens == 6


def test_micro_batches_keep_order_and_budget():
    ss = [_sample(i // 2, i % 2, [1] * 5, [2] * 3, [3], [4] * 3) for i in range(5)]  # 12 tokens each
    assert packing.micro_batches(ss, 24) == [[0, 1], [2, 3], [4]]
    assert packing.micro_batches(ss, 5) == [[0], [1], [2], [3], [4]]


def test_stage1_values_have_no_turn1_pg():
    a = AlgoConfig(name="score")
    r = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
    g = torch.tensor([0, 0, 1, 1])
    v = algos.turn_values(algos.stage_settings(a, "stage1"), r, g)
    assert torch.all(v[:, 0] == 0)
    # RLOO on turn 2 within groups of 2: r - other
    assert v[:, 1].tolist() == [-1.0, 1.0, -1.0, 1.0]


def test_stage2_values_include_bonus():
    a = AlgoConfig(name="score", alpha=10.0)
    r = torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    g = torch.zeros(4, dtype=torch.long)
    v = algos.turn_values(algos.stage_settings(a, "stage2"), r, g)
    shaped2 = torch.tensor([1 + 10 * 1.0, 1.0, 0 - 10 * 1.0, 0.0])  # r2 + alpha (r2 - r1)
    loo = (shaped2.sum() - shaped2) / 3
    assert torch.allclose(v[:, 1], shaped2 - loo)
    r1 = r[:, 0]
    assert torch.allclose(v[:, 0], r1 - (r1.sum() - r1) / 3)
    # without the bonus (multi-turn-rl) turn 2 is plain RLOO
    vm = algos.turn_values(algos.stage_settings(AlgoConfig(name="multi-turn-rl"), "multi-turn-rl"), r, g)
    r2 = r[:, 1]
    assert torch.allclose(vm[:, 1], r2 - (r2.sum() - r2) / 3)


def test_stage1_loss_gradient_on_turn1_is_beta2_kl_only():
    """Stage I: turn-1 tokens get no policy-gradient term, only the beta2-weighted KL."""
    from score_kernels import policy_loss

    torch.manual_seed(0)
    a = AlgoConfig(name="score", beta1=0.01, beta2=0.1)
    st = algos.stage_settings(a, "stage1")
    ss = [_sample(0, i, [1, 2], [3, 4, 5], [6], [7, 8]) for i in range(4)]
    b = packing.pack_samples(ss)
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    v = algos.turn_values(st, rewards, algos.group_ids(ss))
    adv = packing.token_values(v, b)
    n = len(b.input_ids)
    ref = torch.randn(n) * 0.1 - 1.0
    base = torch.randn(n) * 0.1 - 1.0

    def grad(adv_, coef):
        lp = base.clone().requires_grad_(True)
        loss, _ = policy_loss(lp, adv_, b.turn_ids, ref_logprobs=ref, kl_coef=list(coef), kl_estimator="k3",
                              cu_seqlens=b.cu_seqlens, num_turns=2)
        loss.backward()
        return lp.grad

    g_full = grad(adv, st.kl_coef)
    g_kl = grad(torch.zeros_like(adv), st.kl_coef)
    t1, t2 = b.turn_ids == 0, b.turn_ids == 1
    assert torch.allclose(g_full[t1], g_kl[t1], atol=1e-7)  # no PG on turn 1
    assert g_kl[t1].abs().min() > 0
    # the turn-1 KL weight is beta2: doubling beta2 doubles it, beta1 does not touch it
    g_b2 = grad(torch.zeros_like(adv), (2 * st.kl_coef[0], st.kl_coef[1]))
    assert torch.allclose(g_b2[t1], 2 * g_kl[t1], rtol=1e-5)
    assert torch.allclose(g_b2[t2], g_kl[t2], atol=1e-8)
    assert torch.allclose(g_kl[t1] / st.kl_coef[0] * st.kl_coef[1], grad(torch.zeros_like(adv), (0.01, 0.01))[t1],
                          rtol=1e-5)
    # turn 2 does get the policy gradient
    assert not torch.allclose(g_full[t2], g_kl[t2])
    assert torch.all(g_full[b.turn_ids < 0] == 0)


def test_kl_coef_tokens():
    st = algos.stage_settings(AlgoConfig(name="score", beta1=0.01, beta2=0.1), "stage1")
    b = packing.pack_samples([_sample(0, 0, [1, 2], [3, 4], [5], [6])])
    c = algos.kl_coef_tokens(st, b)
    assert torch.allclose(c, torch.tensor([0.1 if t == 0 else 0.01 if t == 1 else 0.0 for t in b.turn_ids.tolist()]))


def test_star_select():
    r = torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    assert algos.star_select(r) == [0]
    assert algos.star_select(r, keep_correct=True) == [0, 1]


def test_pair_sft_build():
    ss = [_sample(0, 0, [1], [10, 11], [], None), _sample(0, 1, [1], [20], [], None),
          _sample(1, 0, [2], [30], [], None), _sample(1, 1, [2], [40], [], None)]
    for s in ss:
        s.turn2_ids = s.turn2_logprobs = s.turn2_text = None
        s.turn1_text = str(s.turn1_ids)
    r = torch.tensor([[0.0], [1.0], [0.0], [0.0]])  # prompt 1 has no right answer: no pair
    out = algos.pair_sft_build(ss, r, lambda s: [99])
    assert len(out) == 1
    p = out[0]
    assert p.turn1_ids == [10, 11] and p.instruction_ids == [99] and p.turn2_ids == [20]
    assert p.full_ids() == [1, 10, 11, 99, 20]
    v = algos.sft_values(1, algos.stage_settings(AlgoConfig(name="pair-sft"), "pair-sft"))
    assert v.tolist() == [[0.0, 1.0]]


def test_unknown_stage():
    with pytest.raises(ValueError):
        algos.stage_settings(AlgoConfig(name="score"), "stage3")


def test_three_turn_settings_pack_and_rewards():
    from score_train.rollout.types import ExtraTurn

    a = AlgoConfig(name="score", num_turns=3, beta1=0.01, beta2=0.1, alpha=10)
    s1, s2 = algos.stage_settings(a, "stage1"), algos.stage_settings(a, "stage2")
    # Stage I: every later turn is trained like turn 2, turn 1 held by beta2; Stage II: all turns, shaped
    assert s1.pg_turns == (False, True, True) and s1.kl_coef == (0.1, 0.01, 0.01) and s1.rollout_turns == 3
    assert s2.pg_turns == (True, True, True) and s2.kl_coef == (0.01,) * 3 and s2.shaping_alpha == 10
    m = algos.stage_settings(AlgoConfig(name="multi-turn-rl", num_turns=3), "multi-turn-rl")
    assert m.pg_turns == (True,) * 3 and m.num_turns == 3
    with pytest.raises(ValueError, match="num_turns=3"):
        algos.stage_settings(AlgoConfig(name="star", num_turns=3), "star")
    s = _sample(0, 0, [1, 2], [3], [5], [6])
    s.extra_turns = [ExtraTurn([5, 9], [7, 8], [-0.75, -0.5], "seven")]
    s.turn1_text, s.turn2_text = "one", "six"
    b = packing.pack_samples([s])
    assert b.input_ids.tolist() == [1, 2, 3, 5, 6, 5, 9, 7, 8]
    # the third turn's tokens are turn 2 (0-based); the instruction between turns 2 and 3 is not trained
    assert b.turn_ids.tolist() == [-1, 0, -1, 1, -1, -1, 2, 2, -1]
    assert b.targets.tolist() == [-100, 3, -100, 6, -100, -100, 7, 8, -100]
    assert b.old_logprobs[6].item() == -0.75 and b.old_logprobs[7].item() == -0.5
    r = algos.reward_table([s], lambda rec, text: float(text == "six" or text == "seven"), [None], 3)
    assert r.tolist() == [[0.0, 1.0, 1.0]]
    # shaping between consecutive turns: turn 3 gets r3 + alpha * (r3 - r2) before the baseline
    v = algos.turn_values(s2, torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]]), torch.tensor([0, 1]),
                          estimator="none")
    assert v.tolist() == [[0.0, 11.0, 1.0], [0.0, 0.0, 11.0]]


def _texts(pi, si, y1, y2):
    return Episode(prompt_index=pi, sample_index=si, prompt_ids=[1], turn1_ids=[2], turn1_logprobs=[-0.5],
                   turn1_text=y1, finish_reasons=["eos", "eos"], instruction_ids=[3], turn2_ids=[4],
                   turn2_logprobs=[-0.5], turn2_text=y2)


def test_change_bonus_counts_a_changed_answer_only_after_a_wrong_turn_1():
    """algo.change_bonus's indicator: turn 2 states another answer than a wrong turn 1 (the reward's own answer
    rule); keeping a wrong answer, changing a right one, or stating none earns nothing."""
    from score_train.data.records import Record

    recs = [Record(id="a", kind="arithmetic", problem="12 + 5", answer="17")]
    samples = [_texts(0, 0, "12 + 5 = 18", "12 + 5 = 17"),     # wrong -> another answer (right): counts
               _texts(0, 1, "12 + 5 = 18", "= 19"),            # wrong -> another wrong answer: counts
               _texts(0, 2, "12 + 5 = 18", "It is 18."),       # wrong, kept: no
               _texts(0, 3, "12 + 5 = 17", "12 + 5 = 16"),     # right, changed: no (the shaping punishes it)
               _texts(0, 4, "12 + 5 = 18", "I am not sure.")]  # wrong -> no answer: no
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    got = algos.changed_after_wrong(samples, recs, rewards)
    assert got.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    code = [Record(id="c", kind="code", problem="def f():", tests="assert f() == 1", entry_point="f")]
    with pytest.raises(ValueError, match="code records"):
        algos.changed_after_wrong(samples[:1], code, rewards[:1])


def test_change_bonus_is_added_to_turn_2_after_the_shaping():
    """turn_values(turn2_bonus=b): turn 2's reward is r2 + alpha (r2 - r1) + b before the RLOO baseline, so in a
    group of two a bonus c on one sample moves the two turn-2 advantages by +c and -c; turn 1 is untouched, and a
    zero bonus gives the paper's values."""
    st = algos.stage_settings(AlgoConfig(name="score", alpha=10.0), "stage2")
    r = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    g = torch.tensor([0, 0])
    plain = algos.turn_values(st, r, g)
    assert torch.allclose(algos.turn_values(st, r, g, turn2_bonus=torch.zeros(2)), plain)
    got = algos.turn_values(st, r, g, turn2_bonus=torch.tensor([0.25, 0.0]))
    assert torch.allclose(got[:, 0], plain[:, 0])
    assert torch.allclose(got[:, 1] - plain[:, 1], torch.tensor([0.25, -0.25]))
    # the shaped turn-2 rewards are 11 and 1 (alpha 10): RLOO gives +10 / -10, then the bonus
    assert torch.allclose(plain[:, 1], torch.tensor([10.0, -10.0]))
