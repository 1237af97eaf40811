"""SCoRe's per-turn advantages as a verl advantage estimator (verl 0.9.1's `register_adv_est`), at the
function level: verl's Ray / vLLM stack is not run here.

    from score_train.integrations.verl import register_score_adv_est

    register_score_adv_est(lambda: stage_at_step(trainer.global_steps), alpha=10.0)   # then
    # algorithm.adv_estimator=score

verl calls the estimator with `token_level_rewards` and `response_mask` ([B, T] over the response) and the group
`index` (the uid of each sample's prompt). A multi-turn response is read as verl's multi-turn rollouts lay it
out: each maximal run of response_mask == 1 is one model turn (turn 0, 1, ...), the masked tokens between the
runs (the instruction) belong to none; turn k's reward is the sum of token_level_rewards over its tokens (a
reward manager puts r_k on turn k's last token). Then, as SCoReTrainer and score-train do: turn_advantages over
each prompt's group (Stage II shaping), zero on the turns without policy gradient (Stage I: turn 1),
token_advantages to the tokens.

Not reachable through verl's hooks: per-turn KL weights. verl's actor applies one `kl_loss_coef` to every
response token and its policy-loss hook (`register_policy_loss`) receives no reference log-probs, so SCoRe's
beta2-on-turn-1 has no place there; with this estimator verl trains SCoRe's advantages under its own KL.
"""
from __future__ import annotations

import types
from collections.abc import Callable

import numpy as np
import torch

from score_kernels import token_advantages, turn_advantages
from score_train import algos

TESTED_VERL = "0.9.1"


def turn_ids_from_mask(response_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] long: k on the tokens of the k-th run of response_mask == 1 (0-based), -1 on masked tokens."""
    m = response_mask.bool()
    starts = m & ~torch.nn.functional.pad(m[:, :-1], (1, 0), value=False)
    return torch.where(m, starts.long().cumsum(dim=1) - 1, torch.full_like(m, -1, dtype=torch.long))


def score_advantages(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index, settings, *,
                     estimator: str = "rloo", std_normalize: bool = False) -> torch.Tensor:
    """[B, T] fp32 per-token advantages of one stage (settings: score_train.algos.StageSettings)."""
    turn = turn_ids_from_mask(response_mask)
    K = settings.num_turns
    if bool((turn >= K).any()):
        raise ValueError(f"a response has {int(turn.max()) + 1} turns (runs of response_mask == 1); the stage trains {K}")
    r = torch.where(turn >= 0, token_level_rewards.float(), torch.zeros((), device=turn.device))
    rewards = torch.zeros(turn.shape[0], K, device=turn.device).scatter_add_(1, turn.clamp(min=0), r)
    _, inverse = np.unique(np.asarray(index), return_inverse=True)
    groups = torch.as_tensor(inverse.reshape(-1), dtype=torch.long, device=turn.device)
    adv = turn_advantages(rewards, groups, estimator=estimator, shaping_alpha=settings.shaping_alpha,
                          std_normalize=std_normalize)
    adv = adv * torch.tensor(settings.pg_turns, dtype=adv.dtype, device=adv.device)
    return token_advantages(adv, turn)


def register_score_adv_est(stage: Callable[[], str], *, name: str = "score", alpha: float = 10.0,
                           beta1: float = 0.01, beta2: float = 0.1, num_turns: int = 2, estimator: str = "rloo",
                           std_normalize: bool = False):
    """Register (and return) verl's advantage estimator `name`. stage() names the stage of the step being
    computed ("stage1" / "stage2"; e.g. score_train.algos.stage_at over verl's trainer.global_steps). Returns
    (advantages, returns), both the per-token advantages, as verl's outcome estimators do."""
    from verl.trainer.ppo.core_algos import register_adv_est

    algo = types.SimpleNamespace(name="score", alpha=alpha, beta1=beta1, beta2=beta2, num_turns=num_turns)

    def score_adv_est(token_level_rewards, response_mask, index=None, config=None, **kwargs):
        if index is None:
            raise ValueError("the SCoRe estimator needs verl's uid index (the prompt group of each response)")
        adv = score_advantages(token_level_rewards, response_mask, index, algos.stage_settings(algo, stage()),
                               estimator=estimator, std_normalize=std_normalize)
        return adv, adv

    return register_adv_est(name)(score_adv_est)
