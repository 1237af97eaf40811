"""SCoRe (Kumar et al. 2024) on TRL's GRPOTrainer: `SCoReTrainer` and its `SCoReConfig`.

    from score_train.integrations.trl import SCoReConfig, SCoReTrainer

    args = SCoReConfig(output_dir="out", stage1_steps=30, stage2_steps=10, num_generations=4, ...)
    trainer = SCoReTrainer(model=model, reward_funcs=reward_fn, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()

One episode is one TRL completion, `prompt_ids | y1 between y2 [between y3 ...]`:
- y_k is sampled by GRPOTrainer's own generation path (`_generate_single_turn`: HF generate, vLLM or continuous
  batching) after the exact ids before it; the ids are never re-tokenised text. `max_completion_length` applies
  to each turn.
- `between` is what the chat template puts after a reply up to the next assistant header, with the user turn
  holding `instruction` (cut from the rendering of [prompt..., assistant PLACEHOLDER, user instruction], as
  score_train.prompts.ChatFormat cuts it), then the tokens of `reply_prefix`. Text prompts get the tokens of
  instruction + reply_prefix. Never trained: TRL's env_mask is 0 there and the turn id is -1.
- Turn k's reward: each reward function called TRL's way (prompts, completions, completion_ids, the dataset
  columns, trainer_state, ...) on turn k's text and ids, with a column `turn` added (k, 1-based, one per
  completion, as the dataset's columns are passed); summed with reward_weights.
- Advantages: score_kernels.turn_advantages over each prompt's num_generations episodes (Stage II: shaping
  r_k + alpha * (r_k - r_{k-1})), zero on turns without policy gradient (Stage I: turn 1), broadcast to the
  tokens with token_advantages.
- Loss: score_kernels.policy_loss over log-probs from linear_logprobs at TRL's sampling temperature
  (score_kernels.integrations.patch_grpo_trainer: no [B, T, V] logits), one KL weight per turn (Stage I: beta2 on
  turn 1, beta1 after; Stage II: beta1), PPO clipping at TRL's epsilon / epsilon_high, normalised by the policy
  tokens of the step as TRL's "dapo" loss is (so gradient accumulation and ranks do not change the update).
- The stage of an optimizer step is score_train.algos.stage_at(TRL's state.global_step).
- Logged through TRL's metrics (so every report_to backend gets them): score/reward_t{k}, score/acc_t{k}
  (reward > 0.5), score/delta, score/i2c, score/c2i (turn 1 -> 2; later pairs score/delta_t{k}{k+1}, ...),
  score/stage (1 or 2), score/kl_t{k}, entropy. TRL's own `reward` and `rewards/<fn>/*` are the last turn's.

What this relies on in TRL is pinned (TESTED_TRL, TRL_HOOKS) and checked when a trainer is built.
"""
from __future__ import annotations

import inspect
import math
import os
import types
import warnings
from dataclasses import dataclass, field

import torch
import trl
from packaging.version import Version
from trl import GRPOConfig, GRPOTrainer
from trl.data_utils import is_conversational

from score_kernels import policy_loss, token_advantages, turn_advantages
from score_kernels.integrations import patch_grpo_trainer
from score_train import algos
from score_train.prompts import MATH_SELF_CORRECT

# trl versions this module was tested with: [low, high)
TESTED_TRL = ("1.16.0", "1.17.0")
ALLOW_UNTESTED_ENV = "SCORE_TRL_ALLOW_UNTESTED"  # "1": an untested trl version warns instead of failing
# GRPOTrainer members this module overrides or calls, with the leading parameters it passes or receives
TRL_HOOKS = {
    "__init__": ("self", "model", "reward_funcs", "args", "train_dataset", "eval_dataset", "processing_class",
                 "reward_processing_classes", "callbacks", "optimizers", "quantization_config", "peft_config",
                 "tools", "rollout_func", "environment_factory"),  # called with rollout_func (+ env_mask)
    "_calculate_rewards": ("self", "inputs", "prompts", "completions", "completion_ids_list"),  # overridden
    "_generate_and_score_completions": ("self", "inputs"),  # overridden
    "_compute_loss": ("self", "model", "inputs"),  # overridden
    "_tokenize_prompts": ("self", "prompts"),  # called
    "_generate_single_turn": ("self", "prompt_ids", "images", "multimodal_fields", "num_generations"),  # called
    "_get_per_token_logps_and_entropies": ("self", "model", "input_ids", "attention_mask", "logits_to_keep"),
}
STAGES = ("stage1", "stage2")
_PLACEHOLDER = "PLACEHOLDER"


def check_trl(version: str | None = None) -> None:
    """Raise RuntimeError unless trl's version is in TESTED_TRL (with SCORE_TRL_ALLOW_UNTESTED=1: warn) and
    GRPOTrainer still has every member of TRL_HOOKS with those parameters."""
    v, (lo, hi) = Version(version or trl.__version__), TESTED_TRL
    if not Version(lo) <= v < Version(hi):
        msg = (f"score_train.integrations.trl is tested with trl>={lo},<{hi}, and trl {v} is installed: it overrides "
               f"GRPOTrainer internals ({', '.join(k for k in TRL_HOOKS if k != '__init__')}) that TRL may change "
               f"in any release.")
        if os.environ.get(ALLOW_UNTESTED_ENV) != "1":
            raise RuntimeError(f"{msg} Install a tested version (pip install 'trl>={lo},<{hi}') or set "
                               f"{ALLOW_UNTESTED_ENV}=1 to try this one.")
        warnings.warn(msg, stacklevel=3)
    changed = []
    for name, params in TRL_HOOKS.items():
        fn = getattr(GRPOTrainer, name, None)
        got = tuple(inspect.signature(fn).parameters) if callable(fn) else ()
        if got[:len(params)] != params:
            changed.append(f"GRPOTrainer.{name}{params} (found {got or 'nothing'})")
    if changed:
        raise RuntimeError(f"trl {v}: GRPOTrainer no longer has what SCoReTrainer relies on: {'; '.join(changed)}")


@dataclass
class SCoReConfig(GRPOConfig):
    r"""[`GRPOConfig`] plus SCoRe's episode and its two stages. GRPOConfig's `beta` is set from beta1 / beta2 (the
    reference model is loaded when either is > 0); `scale_rewards` (see `estimator`) and `use_bias_correction_kl`
    (the KL is policy_loss's estimate, without TRL's importance weight) are not read; `max_steps` defaults to the
    schedule's length."""

    # SCoRe: the schedule
    stage1_steps: int = field(
        default=10,
        metadata={"help": "Stage I optimizer steps: policy gradient on turns 2.. only, turn 1 held near the "
                          "reference by beta2."},
    )
    stage2_steps: int = field(
        default=10,
        metadata={"help": "Stage II optimizer steps: policy gradient on every turn, each later turn's reward shaped "
                          "by alpha."},
    )
    interleave: int = field(
        default=1,
        metadata={"help": "Run (Stage I, Stage II) this many times, each stage's steps split evenly (the paper's v1 "
                          "schedule: 2). max_steps defaults to stage1_steps + stage2_steps and may not exceed it."},
    )
    # SCoRe: rewards, advantages, KL
    alpha: float = field(
        default=10.0,
        metadata={"help": "Stage II shaping: turn k's reward becomes r_k + alpha * (r_k - r_{k-1}) before the "
                          "baseline (the paper: 10, ideally > 1)."},
    )
    beta1: float = field(
        default=0.01,
        metadata={"help": "KL coefficient against the reference on the turns trained by policy gradient (Stage I: "
                          "turns 2..; Stage II: every turn)."},
    )
    beta2: float = field(
        default=0.1,
        metadata={"help": "Stage I KL coefficient on turn 1 (the paper: 0.1 on MATH, 0.25 on MBPP)."},
    )
    kl_estimator: str = field(
        default="k3",
        metadata={"help": "Per-token KL estimate on the sampled tokens: 'k1', 'k2' or 'k3'."},
    )
    estimator: str = field(
        default="rloo",
        metadata={"help": "Each turn's baseline over a prompt's num_generations episodes: 'rloo' (the mean of the "
                          "others), 'grpo' (the group mean), 'reinforce' (the batch mean) or 'none'. Replaces "
                          "scale_rewards, which is not read."},
    )
    std_normalize: bool = field(
        default=False,
        metadata={"help": "With estimator 'grpo' ('reinforce'): divide each turn's advantages by the group's "
                          "(batch's) reward std."},
    )
    # SCoRe: the episode
    num_turns: int = field(
        default=2,
        metadata={"help": "Attempts per episode, 2 to 8: the answer and num_turns - 1 corrections; every later "
                          "turn is trained as turn 2 is."},
    )
    instruction: str = field(
        default=MATH_SELF_CORRECT,
        metadata={"help": "The user message after each turn but the last, the same whatever that turn said (default: "
                          "the paper's MATH self-correction instruction). Text prompts: the exact text appended."},
    )
    reply_prefix: str = field(
        default="",
        metadata={"help": "Fixed text each reply after the instruction starts with: context the model continues, "
                          "never trained and not part of the turn's text its reward sees."},
    )

    def __post_init__(self):
        total = sum(n for _, n in algos.schedule(_algo(self)))
        if self.max_steps is None or self.max_steps <= 0:
            self.max_steps = total
        self.beta = max(self.beta1, self.beta2)  # GRPOTrainer loads the reference and its log-probs when beta != 0
        super().__post_init__()
        bad = []
        need = lambda ok, msg: ok or bad.append(msg)
        need(self.stage1_steps >= 0 and self.stage2_steps >= 0 and total > 0,
             f"stage1_steps and stage2_steps must be >= 0 with a positive sum, got {self.stage1_steps}, "
             f"{self.stage2_steps}")
        need(self.interleave >= 1, f"interleave must be >= 1, got {self.interleave}")
        need(self.max_steps <= total, f"max_steps={self.max_steps} is beyond the SCoRe schedule's {total} steps")
        need(math.isfinite(self.alpha), f"alpha must be finite, got {self.alpha}")
        need(self.beta1 >= 0 and self.beta2 >= 0, f"beta1 and beta2 must be >= 0, got {self.beta1}, {self.beta2}")
        need(self.kl_estimator in ("k1", "k2", "k3"), f"kl_estimator must be 'k1', 'k2' or 'k3', got "
                                                      f"{self.kl_estimator!r}")
        need(self.estimator in ("rloo", "grpo", "reinforce", "none"),
             f"estimator must be 'rloo', 'grpo', 'reinforce' or 'none', got {self.estimator!r}")
        need(not self.std_normalize or self.estimator in ("grpo", "reinforce"),
             f"std_normalize applies to estimator 'grpo' or 'reinforce', not {self.estimator!r}")
        need(2 <= self.num_turns <= 8, f"num_turns must be in [2, 8], got {self.num_turns}")
        # GRPOTrainer features the SCoRe loss does not implement: refused rather than silently dropped
        need(self.loss_type == "dapo", f"loss_type must be 'dapo' (token-mean over the step's policy tokens), got "
                                       f"{self.loss_type!r}")
        for name, off in (("top_entropy_quantile", 1.0), ("off_policy_mask_threshold", None),
                          ("importance_sampling_level", "token"), ("delta", None), ("entropy_coef", 0.0),
                          ("use_adaptive_entropy", False), ("use_liger_kernel", False)):
            need(getattr(self, name) == off, f"{name}={getattr(self, name)!r} is not supported by SCoReTrainer "
                                             f"(leave it at {off!r})")
        if bad:
            raise ValueError("SCoReConfig: " + "; ".join(bad))


def _algo(args):
    """The fields score_train.algos reads for SCoRe's schedule and stage settings."""
    return types.SimpleNamespace(name="score", stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps,
                                 interleave=args.interleave, alpha=args.alpha, beta1=args.beta1, beta2=args.beta2,
                                 num_turns=args.num_turns)


def _score_rollout(prompts, trainer):
    """GRPOTrainer's rollout_func: one episode per prompt (TRL repeats each prompt num_generations times)."""
    return trainer._rollout_episodes(prompts)


class SCoReTrainer(GRPOTrainer):
    """GRPOTrainer training SCoRe's multi-turn episodes (module docstring). Takes GRPOTrainer's arguments but
    tools, environment_factory and rollout_func (the episode is SCoRe's own rollout)."""

    def __init__(self, model, reward_funcs, args: SCoReConfig, train_dataset=None, eval_dataset=None,
                 processing_class=None, reward_processing_classes=None, callbacks=None, optimizers=(None, None),
                 quantization_config=None, peft_config=None):
        check_trl()
        if not isinstance(args, SCoReConfig):
            raise TypeError(f"args must be a SCoReConfig, got {type(args).__name__}")
        if not reward_funcs:
            raise ValueError("reward_funcs: SCoRe scores every turn with them; give at least one")
        self._algo = _algo(args)
        self._settings = {s: algos.stage_settings(self._algo, s) for s in STAGES}
        self._total_steps = algos.total_steps(self._algo)
        self._episodes = self._turn_rewards = None  # handed from the rollout to the scoring of the same batch
        with warnings.catch_warnings():  # rollout_func is SCoRe's own rollout, not a user's experiment
            warnings.filterwarnings("ignore", message="You are using 'rollout_func'", category=UserWarning)
            super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, processing_class=processing_class,
                             reward_processing_classes=reward_processing_classes, callbacks=callbacks,
                             optimizers=optimizers, quantization_config=quantization_config,
                             peft_config=peft_config, rollout_func=_score_rollout)
        patch_grpo_trainer(self)  # this instance's policy and reference heads only

    @property
    def stage(self) -> str:
        """The stage of the current optimizer step ("stage1" or "stage2")."""
        return algos.stage_at(self._algo, min(self.state.global_step, self._total_steps - 1))

    # ------------------------------------------------------------------ the episode
    def _between_ids(self, prompt, prompt_ids: list[int], cache: dict) -> list[int]:
        """The ids after a turn up to the next one's first sampled token (before the end-of-turn dedup)."""
        a, tok = self.args, self._tokenizer
        tail = tok.encode(a.reply_prefix, add_special_tokens=False) if a.reply_prefix else []
        if not is_conversational({"prompt": prompt}):
            return tok.encode(a.instruction, add_special_tokens=False) + tail
        key = tuple(prompt_ids)
        if key not in cache:
            msgs = [*prompt, {"role": "assistant", "content": _PLACEHOLDER}, {"role": "user", "content": a.instruction}]
            full = self.processing_class.apply_chat_template(
                conversation=[msgs], chat_template=self.chat_template, add_generation_prompt=True, tokenize=True,
                return_dict=True, **self.chat_template_kwargs)["input_ids"][0]
            full, ph, n = list(full), tok.encode(_PLACEHOLDER, add_special_tokens=False), len(prompt_ids)
            if full[:n] != list(prompt_ids) or full[n:n + len(ph)] != ph:
                raise ValueError("the chat template does not render [prompt..., assistant, user] as the prompt's ids "
                                 "followed by the assistant's content; cannot build the ids between turns")
            cache[key] = full[n + len(ph):]
        return cache[key] + tail

    def _rollout_episodes(self, prompts) -> dict:
        """Turn 1 from the prompt ids, then per later turn: the ids between, a turn sampled after the exact ids so
        far. -> rollout_func's dict (prompt_ids, completion_ids, logprobs, env_mask)."""
        mode = "train" if self.model.training else "eval"
        n = self.num_generations if mode == "train" else self.num_generations_eval
        prompt_ids, images, multimodal = self._tokenize_prompts(prompts)
        if images is not None or multimodal:
            raise ValueError("SCoReTrainer: multimodal prompts are not supported")
        B, eos, cache = len(prompts), set(self.eos_token_ids), {}
        prompt_ids = [list(p) for p in prompt_ids]
        context = [list(p) for p in prompt_ids]
        turns = [[] for _ in range(B)]  # each sample's turns' ids
        completion, env_mask, turn_ids, logprobs = ([[] for _ in range(B)] for _ in range(4))
        have_logprobs = True
        for k in range(self.args.num_turns):
            if k:
                for i in range(B):
                    mid = self._between_ids(prompts[i], prompt_ids[i], cache)
                    prev = turns[i][-1]
                    if prev and mid and prev[-1] in eos and prev[-1] == mid[0]:  # the turn already ended it
                        mid = mid[1:]
                    context[i] += mid
                    completion[i] += mid
                    env_mask[i] += [0] * len(mid)
                    turn_ids[i] += [-1] * len(mid)
                    logprobs[i] += [0.0] * len(mid)
            # a later turn continues each sample's own context: one generation each
            ids, lps = self._generate_single_turn(context, None, {}, n if k == 0 else 1)
            have_logprobs = have_logprobs and lps is not None
            for i in range(B):
                y = list(ids[i])
                turns[i].append(y)
                context[i] += y
                completion[i] += y
                env_mask[i] += [1] * len(y)
                turn_ids[i] += [k] * len(y)
                if lps is not None:
                    logprobs[i] += list(lps[i])
        self._episodes = {"turns": turns, "turn_tokens": turn_ids}
        return {"prompt_ids": prompt_ids, "completion_ids": completion, "env_mask": env_mask,
                "logprobs": logprobs if have_logprobs else None}

    # ------------------------------------------------------------------ rewards and advantages
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """Each turn scored by every reward function, TRL's way; returns the last turn's (what TRL logs as
        `reward`) and keeps the weighted per-turn sums [B_all, K] for the advantages."""
        turns = self._episodes["turns"]
        conversational = is_conversational({"prompt": prompts[0]})
        per_turn, last = [], None
        for k in range(self.args.num_turns):
            ids = [t[k] for t in turns]
            texts = self.processing_class.batch_decode(ids, skip_special_tokens=True)
            turn_completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
            per_func = super()._calculate_rewards([{**x, "turn": k + 1} for x in inputs], prompts, turn_completions,
                                                  ids)
            if torch.isnan(per_func).all(dim=1).any():
                raise ValueError(f"turn {k + 1}: every reward function returned None for an episode; SCoRe needs a "
                                 "reward for every turn")
            per_turn.append((per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1))
            last = per_func
        self._turn_rewards = torch.stack(per_turn, dim=1)
        return last

    def _turn_values(self, rewards, groups, st) -> torch.Tensor:
        """[B, K] per-turn advantages of one stage (score_train.algos.turn_values, on the rewards' device)."""
        adv = turn_advantages(rewards.float(), groups, estimator=self.args.estimator,
                              shaping_alpha=st.shaping_alpha, std_normalize=self.args.std_normalize)
        return adv * torch.tensor(st.pg_turns, dtype=adv.dtype, device=adv.device)

    def _generate_and_score_completions(self, inputs):
        """GRPOTrainer's batch plus score_turn_ids [B, C] (each completion token's turn, -1 between turns and on
        padding) and score_turn_values [B, 2, K] (each stage's per-turn advantages, so an optimizer step trains
        with its own stage's); `advantages` becomes the current stage's per-token advantages."""
        out = super()._generate_and_score_completions(inputs)
        turn_lists, rewards = self._episodes["turn_tokens"], self._turn_rewards
        self._episodes = self._turn_rewards = None
        B, C = out["completion_ids"].shape
        dev = out["completion_ids"].device
        turn_ids = torch.full((B, C), -1, dtype=torch.long)
        for i, t in enumerate(turn_lists):
            turn_ids[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        mask = out["completion_mask"] * out["tool_mask"] if "tool_mask" in out else out["completion_mask"]
        turn_ids = turn_ids.to(dev).masked_fill(mask == 0, -1)  # e.g. mask_truncated_completions
        mode = "train" if self.model.training else "eval"
        n = self.num_generations if mode == "train" else self.num_generations_eval
        groups = torch.arange(rewards.shape[0], device=rewards.device) // n  # TRL's batches hold whole groups
        values = torch.stack([self._turn_values(rewards, groups, self._settings[s]) for s in STAGES], dim=1)
        start = self.accelerator.process_index * B
        values = values[start:start + B].to(dev)
        out["score_turn_ids"], out["score_turn_values"] = turn_ids, values
        out["advantages"] = token_advantages(values[:, STAGES.index(self.stage)], turn_ids)
        self._log_turns(rewards, mode)
        return out

    def _log_turns(self, rewards, mode: str) -> None:
        m, right = self._metrics[mode], rewards > 0.5
        for k in range(rewards.shape[1]):
            m[f"score/reward_t{k + 1}"].append(rewards[:, k].float().mean().item())
            m[f"score/acc_t{k + 1}"].append(right[:, k].float().mean().item())
        for k in range(1, rewards.shape[1]):
            tag = "" if k == 1 else f"_t{k}{k + 1}"
            i2c = (~right[:, k - 1] & right[:, k]).float().mean().item()
            c2i = (right[:, k - 1] & ~right[:, k]).float().mean().item()
            m[f"score/delta{tag}"].append(i2c - c2i)
            m[f"score/i2c{tag}"].append(i2c)
            m[f"score/c2i{tag}"].append(c2i)

    # ------------------------------------------------------------------ the loss
    def _compute_loss(self, model, inputs):
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True)
        stage = self.stage
        st, K = self._settings[stage], self.args.num_turns
        turn_ids = inputs["score_turn_ids"]
        adv = token_advantages(inputs["score_turn_values"][:, STAGES.index(stage)], turn_ids)
        if "importance_sampling_ratio" in inputs:  # TRL's vLLM correction, on the policy-gradient term as TRL has it
            adv = adv * inputs["importance_sampling_ratio"]
        mode = "train" if self.model.training else "eval"
        # TRL's "dapo" normaliser: the generation batch's policy tokens, rescaled to one accumulation window
        norm = inputs["num_items_in_batch"].float().clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            norm = norm * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        ref = inputs.get("ref_per_token_logps")
        loss, stats = policy_loss(
            logps, adv, turn_ids, old_logprobs=inputs.get("old_per_token_logps"), ref_logprobs=ref,
            kl_coef=list(st.kl_coef) if ref is not None else [0.0] * K, kl_estimator=self.args.kl_estimator,
            clip_eps=(self.epsilon_low, self.epsilon_high), agg="token-mean", global_token_count=norm, num_turns=K)
        self._log_loss(stats, entropies, turn_ids, stage, mode, ref is not None)
        return loss

    def _log_loss(self, stats, entropies, turn_ids, stage: str, mode: str, kl: bool) -> None:
        m, sel = self._metrics[mode], (turn_ids >= 0).float()

        def global_mean(total, count):
            t = self.accelerator.reduce(torch.stack([total.float(), count.float()]), reduction="sum")
            return (t[0] / t[1].clamp(min=1.0)).item()

        m["score/stage"].append(float(STAGES.index(stage) + 1))
        if kl:
            for k in range(self.args.num_turns):
                n_k = stats[f"tokens_turn{k}"]
                m[f"score/kl_t{k + 1}"].append(global_mean(stats[f"kl_turn{k}"] * n_k, n_k))
        if entropies is not None:
            m["entropy"].append(global_mean((entropies.detach() * sel).sum(), sel.sum()))
