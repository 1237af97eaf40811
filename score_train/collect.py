"""Rollout collection: a generator that yields, step after step, the step's samples with their rewards and
per-turn advantages. The trainer's loop only consumes it (like nanochat's `get_batch`).

The generator is lazy: step s's rollouts are drawn when the loop asks for them, i.e. after step s-1's update, so
they always come from the current weights (the engine shares the policy's parameters).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from score_train import algos
from score_train import distributed as D
from score_train.prompts import ChatFormat, eos_ids_of
from score_train.rollout.engine import sample_seed
from score_train.rollout.types import Episode, SamplingParams


@dataclass
class RolloutBatch:
    step: int  # 0-based global step
    stage: str
    settings: algos.StageSettings
    records: list  # this rank's prompts; sample.prompt_index indexes them
    samples: list[Episode]  # B = prompts x n (x turn2_n), a prompt's samples consecutive
    rewards: torch.Tensor  # [B, K] per-turn rewards
    train_samples: list[Episode]  # what the loss sees (the SFT baselines select or build them)
    values: torch.Tensor  # [B', K] per-turn advantages of train_samples (1 on SFT turns)
    data_pos: int  # position in the shuffled train split after this step
    stats: dict = field(default_factory=dict)  # rollout_s, gen_tokens, gen_tokens_per_s


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 17) % (2**31)


def turn2_texts(rollout_cfg, instruction: str, seed: int, prompt_indices) -> tuple[str | list[str], str | list[str]]:
    """The turn-2 instruction and reply opening of each prompt of a step: the fixed ones (strings) without a pool;
    with rollout.instruction_pool / reply_prefix_pool, one draw per prompt (by its global index, so every rank and
    a resumed run draw the same) from [the fixed one, *pool], the two independently ('none' = no opening)."""
    ipool, ppool = rollout_cfg.instruction_pool, rollout_cfg.reply_prefix_pool
    if not ipool and not ppool:
        return instruction, rollout_cfg.reply_prefix
    rngs = [random.Random(sample_seed(seed, i, 7)) for i in prompt_indices]
    instrs = [r.choice([instruction, *ipool]) for r in rngs]
    prefixes = [r.choice([rollout_cfg.reply_prefix, *ppool]) for r in rngs]
    return instrs, ["" if p == "none" else p for p in prefixes]


def advantages(algo, st: algos.StageSettings, samples, rewards, suffix_of=None, turn2_bonus=None):
    """-> (train_samples, values [B', K]). RL stages: shaped rewards, group baseline, zero on turns without PG.
    STaR keeps the corrected traces; pair-SFT builds (wrong y1, right y) traces with suffix_of(sample) the
    instruction ids after that sample's y1. SFT values are 1 on the trained turns."""
    if not st.sft:
        if any(s.branch_index for s in samples):  # rollout.turn2_n > 1
            return samples, algos.branched_turn_values(st, rewards, samples, estimator=algo.estimator,
                                                       std_normalize=algo.std_normalize)
        return samples, algos.turn_values(st, rewards, algos.group_ids(samples), estimator=algo.estimator,
                                          std_normalize=algo.std_normalize, turn2_bonus=turn2_bonus)
    if algo.name == "star":
        kept = [samples[i] for i in algos.star_select(rewards, algo.star_keep_correct)]
    else:
        kept = algos.pair_sft_build(samples, rewards, suffix_of)
    return kept, algos.sft_values(len(kept), st)


def collect(cfg, rollout, model, tok, records, order, *, start_step: int, data_pos: int, total: int, info,
            reward_fn, instruction: str, prompt_of, hook=None, capture_layer: int = 0):
    """Yields one RolloutBatch per step in [start_step, total). A failure while sampling or scoring on any rank
    raises on every rank (distributed.all_ok). hook(step, info), if given, runs right after sampling (tests inject
    failures through it). capture_layer=k > 0 (the trainer's frozen bottom k layers): a rollout that can
    (the paged engine) returns each sample's residual after them, so the optimisation step does not rerun them."""
    a, P, n = cfg.algo, cfg.rollout.prompts_per_step, cfg.rollout.n
    mine = D.shard_prompts(P, info)  # this rank's prompts (all of them in one process)
    chat, eos = ChatFormat(tok), eos_ids_of(model, tok)
    for step in range(start_step, total):
        stage = algos.stage_at(a, step)
        st = algos.stage_settings(a, stage)
        recs = [records[order[(data_pos + i) % len(order)]] for i in mine]
        params = SamplingParams(n=n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                max_new_tokens=cfg.rollout.max_new_tokens, seed=step_seed(cfg.run.seed, step),
                                turn2_n=cfg.rollout.turn2_n if st.rollout_turns == 2 else 1)
        # seeds by global prompt index, so the samples are the same whatever the rank count (rank 0's are the defaults)
        seeds = [sample_seed(params.seed, i, j) for i in mine for j in range(n)] if mine.start else None
        instr, prefix = turn2_texts(cfg.rollout, instruction, params.seed, mine)
        t0 = time.perf_counter()
        model.eval()
        err, samples, rewards = None, [], None
        try:
            with D.gathered(model):
                samples = rollout.generate([prompt_of(r) for r in recs], params, two_turn=st.two_turn,
                                           instruction=instr, num_turns=st.rollout_turns, seeds=seeds,
                                           capture_layer=capture_layer, reply_prefix=prefix if st.two_turn else "")
            if hook is not None:
                hook(step, info)
            rewards = algos.reward_table(samples, reward_fn, recs, st.rollout_turns)  # [B, K]
        except Exception as e:  # noqa: BLE001 - re-raised on every rank by the barrier below
            err = e
        D.all_ok(err, info)
        t_roll = time.perf_counter() - t0
        suffix = chat.suffixes([prompt_of(r) for r in recs], instr, prefix) if a.name == "pair-sft" else None
        # (config: only two-turn score / multi-turn-rl, whose every stage trains turn 2)
        bonus = a.change_bonus * algos.changed_after_wrong(samples, recs, rewards) if a.change_bonus else None
        train_samples, values = advantages(
            a, st, samples, rewards,
            lambda s, suffix=suffix: ChatFormat.instruction_ids(suffix[s.prompt_index], s.turn1_ids, eos),
            turn2_bonus=bonus)
        gen = sum(len(t) for s in samples for t in s.turn_tokens)
        model.train()
        data_pos += P
        stats = {"rollout_s": t_roll, "gen_tokens": gen, "gen_tokens_per_s": gen / max(t_roll, 1e-9)}
        if bonus is not None:  # how often turn 2 earned the bonus (changed a wrong turn 1's answer)
            stats["changed_after_wrong"] = float(bonus.gt(0).float().mean())
        yield RolloutBatch(step, stage, st, recs, samples, rewards, train_samples, values, data_pos, stats)
