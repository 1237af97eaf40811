"""score_train.integrations.verl at the function level against the real verl (0.9.1; its Ray / vLLM stack cannot
run here): on a fixed batch of two-turn responses laid out as verl's multi-turn rollouts are (turns = runs of
response_mask, rewards on each turn's last token), the estimator registered with verl's register_adv_est gives
score-train's own per-token advantages, in Stage I and Stage II."""
import numpy as np
import pytest
import torch

from tests.external._peers import need

core_algos = need("verl.trainer.ppo.core_algos")

from score_train.integrations import verl as score_verl

G = 4
Y1 = [[40, 41, 1], [42, 43, 44, 45], [46, 1], [47, 48, 49], [50, 51, 52, 1], [53, 54], [55, 56, 57], [58, 1]]
MID = [[3, 7, 8], [1, 3, 7, 8], [3, 7, 8], [1, 3, 7, 8], [3, 7, 8], [1, 3, 7, 8], [1, 3, 7, 8], [3, 7, 8]]
Y2 = [[60, 61], [62, 63, 64, 1], [65, 66, 67], [68, 1], [69, 70], [71, 72, 73, 74], [75, 1], [76, 77, 78]]
R1 = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
R2 = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.5]
ALGO = dict(alpha=3.0, beta1=0.05, beta2=0.3)


def _verl_batch():
    """verl's view: response tokens [B, T] = y1 + instruction + y2 (right-padded), response_mask 0 on the
    instruction and padding, each turn's reward on its last token, uid per prompt."""
    T = max(len(a) + len(m) + len(b) for a, m, b in zip(Y1, MID, Y2))
    mask, rewards = torch.zeros(len(Y1), T, dtype=torch.long), torch.zeros(len(Y1), T)
    for i, (a, m, b) in enumerate(zip(Y1, MID, Y2)):
        mask[i, :len(a)] = 1
        mask[i, len(a) + len(m):len(a) + len(m) + len(b)] = 1
        rewards[i, len(a) - 1] = R1[i]
        rewards[i, len(a) + len(m) + len(b) - 1] = R2[i]
    index = np.array([f"uid-{i // G}" for i in range(len(Y1))], dtype=object)
    return rewards, mask, index


def _score_train_token_advantages(stage: str) -> torch.Tensor:
    """score-train's own per-turn values and per-token broadcast on the same samples, in verl's response layout."""
    from types import SimpleNamespace

    from score_train import algos, packing
    from score_train.rollout.types import Episode

    prompt = [5, 6]
    samples = [Episode(prompt_index=i // G, sample_index=i % G, prompt_ids=prompt, turn1_ids=a,
                             turn1_logprobs=[0.0] * len(a), turn1_text="", finish_reasons=[], instruction_ids=m,
                             turn2_ids=b, turn2_logprobs=[0.0] * len(b), turn2_text="")
               for i, (a, m, b) in enumerate(zip(Y1, MID, Y2))]
    st = algos.stage_settings(SimpleNamespace(name="score", num_turns=2, **ALGO), stage)
    values = algos.turn_values(st, torch.tensor([R1, R2]).T, algos.group_ids(samples), estimator="rloo")
    packed = packing.pack_samples(samples)
    tok, cu = packing.token_values(values, packed), packed.cu_seqlens.tolist()
    T = max(len(a) + len(m) + len(b) for a, m, b in zip(Y1, MID, Y2))
    out = torch.zeros(len(samples), T)
    for i, (a, m, b) in enumerate(zip(Y1, MID, Y2)):
        n = len(a) + len(m) + len(b)
        out[i, :n] = tok[cu[i] + len(prompt) - 1: cu[i] + len(prompt) - 1 + n]  # position j predicts token j + 1
    return out


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_registered_estimator_equals_score_train(stage, monkeypatch):
    monkeypatch.setattr(core_algos, "ADV_ESTIMATOR_REGISTRY", dict(core_algos.ADV_ESTIMATOR_REGISTRY))
    current = {"stage": stage}
    score_verl.register_score_adv_est(lambda: current["stage"], name="score-test", **ALGO)
    fn = core_algos.get_adv_estimator_fn("score-test")
    rewards, mask, index = _verl_batch()
    adv, returns = fn(token_level_rewards=rewards, response_mask=mask, index=index, config=None)  # verl's call
    expected = _score_train_token_advantages(stage)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-6)
    assert torch.equal(adv, returns) and adv.abs().sum() > 0
    turn = score_verl.turn_ids_from_mask(mask)
    assert torch.equal(adv[turn < 0], torch.zeros_like(adv[turn < 0]))
    if stage == "stage1":
        assert torch.equal(adv[turn == 0], torch.zeros_like(adv[turn == 0]))


def test_turn_ids_from_mask():
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 1, 0, 1, 1, 1]])
    assert score_verl.turn_ids_from_mask(mask).tolist() == [[0, 0, -1, -1, 1, -1], [-1, 0, -1, 1, 1, 1]]
