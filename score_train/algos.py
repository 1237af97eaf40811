"""The algorithms as small pure functions: the stage schedule and per-stage loss settings, rewards and
per-turn advantages, and the SFT data builders of the baselines. Packing samples into batches is
`score_train.packing`.

Shapes: B samples, K turns (2, or algo.num_turns), N packed tokens of a micro-batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from score_train.config import MULTI_TURN_ALGOS
from score_train.packing import PackedBatch
from score_train.rollout.types import Episode

SFT_ALGOS = ("star", "pair-sft")


@dataclass(frozen=True)
class StageSettings:
    """What one optimisation step of an algorithm trains."""
    name: str  # "stage1", "stage2", "multi-turn-rl", ...
    two_turn: bool  # do rollouts produce more than one turn (num_turns of them)?
    pg_turns: tuple[bool, ...]  # per turn: does the policy gradient (or SFT) apply?
    kl_coef: tuple[float, ...]  # per turn KL weight against the reference
    shaping_alpha: float = 0.0  # turn-2 reward bonus alpha * (r2 - r1), applied before the baseline
    sft: bool = False  # star / pair-sft: advantages are 1 on kept turns (NLL), no baseline

    @property
    def num_turns(self) -> int:
        """Turns the loss sees (pair-sft trains a built turn 2 from single-turn rollouts)."""
        return len(self.pg_turns)

    @property
    def rollout_turns(self) -> int:
        return self.num_turns if self.two_turn else 1


def stage_settings(algo, stage: str) -> StageSettings:
    """The paper's settings. `algo` is a config.AlgoConfig; stage is "stage1"/"stage2" for score.
    With algo.num_turns = K > 2 (score and multi-turn-rl) every later turn is treated as the paper treats
    turn 2: Stage I trains turns 2..K with beta1 and holds turn 1 with beta2; Stage II shapes each turn
    against the one before it (r_k + alpha * (r_k - r_{k-1}), score_kernels.shape_rewards)."""
    b1, b2 = algo.beta1, algo.beta2
    K = algo.num_turns
    if K != 2 and algo.name not in MULTI_TURN_ALGOS:
        raise ValueError(f"algo.num_turns={K} applies to {', '.join(MULTI_TURN_ALGOS)}, not {algo.name!r}")
    later = K - 1
    if algo.name == "score":
        if stage == "stage1":
            # PG on the later turns only; turn 1 held near the reference by the strong beta2.
            return StageSettings("stage1", True, (False,) + (True,) * later, (b2,) + (b1,) * later)
        if stage == "stage2":
            return StageSettings("stage2", True, (True,) * K, (b1,) * K, shaping_alpha=algo.alpha)
        raise ValueError(f"score has stages stage1 and stage2, got {stage!r}")
    if algo.name == "multi-turn-rl":
        return StageSettings("multi-turn-rl", True, (True,) * K, (b1,) * K)
    if algo.name == "single-turn-rl":
        return StageSettings("single-turn-rl", False, (True,), (b1,))
    if algo.name == "star":
        return StageSettings("star", True, (False, True), (0.0, 0.0), sft=True)
    if algo.name == "pair-sft":
        # Rollouts are single-turn; the builder makes (wrong y1, correct y) pairs.
        return StageSettings("pair-sft", False, (False, True), (0.0, 0.0), sft=True)
    raise ValueError(f"algorithm {algo.name!r} has no training stages")


def schedule(algo) -> list[tuple[str, int]]:
    """[(stage, steps), ...] in order. score with interleave=m: m x (Stage I, Stage II), steps split evenly."""
    if algo.name == "self-refine":
        return []
    if algo.name != "score":
        return [(algo.name, algo.steps)]
    out = []
    m = algo.interleave
    for i in range(m):
        s1 = algo.stage1_steps // m + (1 if i < algo.stage1_steps % m else 0)
        s2 = algo.stage2_steps // m + (1 if i < algo.stage2_steps % m else 0)
        out += [("stage1", s1), ("stage2", s2)]
    return [(s, n) for s, n in out if n > 0]


def stage_at(algo, step: int) -> str:
    """The stage that 0-based global step `step` runs."""
    for stage, n in schedule(algo):
        if step < n:
            return stage
        step -= n
    raise IndexError("step beyond the schedule")


def total_steps(algo) -> int:
    return sum(n for _, n in schedule(algo))


def reward_table(samples: list[Episode], reward_fn, records, num_turns: int) -> torch.Tensor:
    """[B, K] fp32 rewards; reward_fn(record, text) -> float; sample.prompt_index indexes records.
    A turn the sample does not have (a one-turn rollout of a K-turn table) scores as the empty text."""
    out = torch.zeros(len(samples), num_turns)
    for i, s in enumerate(samples):
        rec = records[s.prompt_index]
        texts = s.turn_texts
        for k in range(num_turns):
            out[i, k] = float(reward_fn(rec, (texts[k] if k < len(texts) else None) or ""))
    return out


def changed_after_wrong(samples: list[Episode], records, rewards: torch.Tensor) -> torch.Tensor:
    """[B] fp32: 1 where turn 1 was wrong (reward 0) and turn 2 states an answer other than turn 1's (by
    rewards.answer_key, the rule the reward reads; no answer is no change). records: data.Record, by prompt_index."""
    from score_train.rewards import answer_key

    out = torch.zeros(len(samples))
    for i, s in enumerate(samples):
        if rewards[i, 0] > 0 or len(s.turn_texts) < 2:
            continue
        kind = records[s.prompt_index].kind
        if kind == "code":  # a jsonl task's kind is only known here
            raise ValueError("algo.change_bonus compares the turns' stated answers, which code records do not have")
        k1, k2 = answer_key(kind, s.turn_texts[0]), answer_key(kind, s.turn_texts[1])
        out[i] = float(k2 is not None and k2 != k1)
    return out


def group_ids(samples: list[Episode]) -> torch.Tensor:
    """[B] int64: the samples of one prompt share an id (the RLOO/GRPO group)."""
    return torch.tensor([s.prompt_index for s in samples], dtype=torch.long)


def turn_values(settings: StageSettings, rewards: torch.Tensor, groups: torch.Tensor, *,
                estimator: str = "rloo", std_normalize: bool = False,
                turn2_bonus: torch.Tensor | None = None) -> torch.Tensor:
    """[B, K] per-turn advantages of an RL stage: shaped rewards (+ turn2_bonus [B] on turn 2, algo.change_bonus)
    -> group baseline -> zero on turns without policy gradient (so Stage I has no turn-1 PG term)."""
    from score_kernels import turn_advantages
    from score_kernels.advantages import shape_rewards

    if turn2_bonus is None:
        adv = turn_advantages(rewards.float(), groups, estimator=estimator,
                              shaping_alpha=settings.shaping_alpha, std_normalize=std_normalize)
    else:  # algo.change_bonus: added to turn 2's shaped reward, before the baseline
        shaped = shape_rewards(rewards.float(), settings.shaping_alpha).clone()
        shaped[:, 1] += turn2_bonus.to(shaped.dtype)
        adv = turn_advantages(shaped, groups, estimator=estimator, std_normalize=std_normalize)
    mask = torch.tensor(settings.pg_turns[: adv.shape[1]], dtype=adv.dtype)
    return adv * mask


def branched_turn_values(settings: StageSettings, rewards: torch.Tensor, samples: list[Episode], *,
                         estimator: str = "rloo", std_normalize: bool = False) -> torch.Tensor:
    """[B, 2] advantages of two-turn rollouts with turn-2 branches (SamplingParams.turn2_n > 1: each y1 followed by
    m turn-2 samples). Turn 2's baseline is its siblings, the other turns 2 after the same y1, so its advantage
    says whether this turn 2 did better than the others did from that very y1 (r1 is shared, so Stage II's
    shaping only scales it by 1 + alpha). Turn 1's baseline is the prompt's other distinct y1s; it is set on
    branch 0 only, the one row whose y1 tokens are trained (pack_samples)."""
    if rewards.shape[1] != 2:
        raise ValueError(f"turn-2 branches need two turns, got rewards of {rewards.shape[1]}")
    rows = [i for i, s in enumerate(samples) if s.branch_index == 0]  # one row per distinct y1
    y1 = torch.tensor([s.prompt_index * (1 << 20) + s.sample_index for s in samples], dtype=torch.long)
    out = torch.zeros(len(samples), 2)
    out[:, 1] = turn_values(settings, rewards, y1, estimator=estimator, std_normalize=std_normalize)[:, 1]
    out[rows, 0] = turn_values(settings, rewards[rows], group_ids([samples[i] for i in rows]), estimator=estimator,
                               std_normalize=std_normalize)[:, 0]
    return out


def kl_coef_tokens(settings: StageSettings, batch: PackedBatch) -> torch.Tensor:
    """[N] fp32: the KL weight of each token's turn (0 off-policy tokens)."""
    coef = torch.tensor(list(settings.kl_coef) + [0.0], dtype=torch.float32)
    return coef[torch.where(batch.turn_ids >= 0, batch.turn_ids, torch.full_like(batch.turn_ids, -1))]


# ---------------------------------------------------------------- SFT baselines (self-generated data)

def star_select(rewards: torch.Tensor, keep_correct: bool = False) -> list[int]:
    """STaR on correction traces: keep the samples whose y2 is right after a wrong y1 (and with
    keep_correct also right->right). rewards [B, 2] -> kept row indices. SFT then trains y2."""
    r1, r2 = rewards[:, 0] > 0.5, rewards[:, 1] > 0.5
    keep = (~r1 & r2) | (r1 & r2 if keep_correct else torch.zeros_like(r1))
    return keep.nonzero().flatten().tolist()


def pair_sft_build(samples: list[Episode], rewards: torch.Tensor, instruction_ids_fn) -> list[Episode]:
    """Pair-SFT: for each prompt, pair every wrong first attempt with a correct attempt to the same
    prompt, giving synthetic traces (x, y_wrong, instruction, y_right); SFT trains the y_right turn.

    rewards [B, 1 or 2] (turn 1 is used). instruction_ids_fn(sample) -> the instruction token ids that
    follow that sample's y1 (they depend on whether y1 ended with EOS)."""
    by_prompt: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_prompt.setdefault(s.prompt_index, []).append(i)
    out = []
    for rows in by_prompt.values():
        right = [i for i in rows if rewards[i, 0] > 0.5]
        wrong = [i for i in rows if rewards[i, 0] <= 0.5]
        for j, w in enumerate(wrong):
            if not right:
                break
            r = samples[right[j % len(right)]]
            s = samples[w]
            out.append(Episode(
                prompt_index=s.prompt_index, sample_index=s.sample_index, prompt_ids=s.prompt_ids,
                turn1_ids=s.turn1_ids, turn1_logprobs=s.turn1_logprobs, turn1_text=s.turn1_text,
                finish_reasons=s.finish_reasons + r.finish_reasons[:1],
                instruction_ids=list(instruction_ids_fn(s)),
                turn2_ids=list(r.turn1_ids), turn2_logprobs=[0.0] * len(r.turn1_ids), turn2_text=r.turn1_text))
    return out


def sft_values(num_samples: int, settings: StageSettings) -> torch.Tensor:
    """[B, 2]: 1 on the turns SFT trains (the NLL is the PG loss with advantage 1, no baseline)."""
    return torch.tensor([[1.0 if t else 0.0 for t in settings.pg_turns]] * num_samples)
