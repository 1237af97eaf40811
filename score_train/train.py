"""`score-train`: SCoRe (Stage I -> Stage II) and its baselines, from one YAML config.

`train()` reads top to bottom: 1. processes, seeds, run directory; 2. policy, frozen reference, rollout engine
(sharing the policy's parameters), data; 3. optimiser and the state to resume from; 4. per step:

    collect   score_train.collect.collect yields the step's two-turn samples, rewards [B, K] and
              per-turn advantages [B, K] (shaping, group baseline; SFT baselines: 1 on kept turns)
    optimise  train_step: packed micro-batches -> frozen prefix once -> policy (and reference) top layers ->
              fused log-probs at the sampling temperature -> score_train.losses -> backward, clip, AdamW
    log / eval / checkpoint

5. the final evaluation, export and summary. Single-process and torchrun runs differ only inside
`score_train.distributed` (global counts, padding passes, sharded checkpoints: no-ops in one process); the n
samples of one prompt always stay on one rank.
"""
from __future__ import annotations

import copy
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import torch

from score_train import algos, checkpoint, losses, packing, trained_settings
from score_train import distributed as D
from score_train import model as modeling
from score_train.collect import collect
from score_train.config import Config, UsageError
from score_train.eval import evaluate_run, fmt_eval
from score_train.packing import PackedBatch
from score_train.preflight import load_records
from score_train.prompts import self_correction_instruction, turn1_message
from score_train.rewards import reward as task_reward
from score_train.rollout import Rollout, make_rollout
from score_train.rundir import Logger, Progress, open_run, step_record, write_summary, write_train_samples

# ---------------------------------------------------------------------------- set-up helpers

def set_trainable(model, train_layers: int, train_embeddings: bool) -> int:
    """Freeze all but the top `train_layers` decoder layers (0 = all). Returns the index of the first
    trainable layer: the layers below it (and the input embedding) are frozen, so they are identical
    in the reference and run once for both. Training only the top layers also freezes the
    embeddings (with tied embeddings they are the lm_head too)."""
    n = model.num_layers
    cut = 0 if train_layers <= 0 else max(0, n - train_layers)
    emb = train_embeddings and cut == 0
    for i, layer in enumerate(model.model.layers):
        layer.requires_grad_(i >= cut)
    model.model.norm.requires_grad_(True)
    model.model.embed_tokens.requires_grad_(emb)
    if getattr(model, "lm_head", None) is not None:
        model.lm_head.requires_grad_(emb)
    return cut


def prepare_policy(model, mc) -> int:
    """What trains, per model config `mc`: the top mc.train_layers layers' weights, or (mc.lora_rank > 0) LoRA
    adapters on those layers' projections with every weight frozen. Returns the first trained layer (the
    frozen prefix below it is shared with the reference). Checkpoints hold exactly these parameters."""
    cut = set_trainable(model, mc.train_layers, mc.train_embeddings)
    if mc.lora_rank > 0:
        model.add_lora(mc.lora_rank, mc.lora_alpha, from_layer=cut)
    return cut


def make_reward_fn(cfg: Config):
    """reward(record, text) -> 0/1 by the record's kind (tests pass train(reward_fn=...) instead)."""
    return lambda rec, text: task_reward(rec.kind, text, rec)


def build_rollout(cfg: Config, model, tokenizer) -> Rollout:
    """The training rollouts' backend (rollout.engine), sampling in rollout.dtype; it shares the policy's weights."""
    if cfg.rollout.dtype != "model" and D.is_sharded(model):
        raise UsageError(f"rollout.dtype={cfg.rollout.dtype} is single-process only: under torchrun the sampler "
                         f"runs FSDP2's gathered weights, which it cannot swap for copies")
    return make_rollout(model, tokenizer, engine=cfg.rollout.engine,
                        compute_dtype=None if cfg.rollout.dtype == "model" else torch.bfloat16)


def prompt_of(cfg: Config, rec) -> str:
    return turn1_message(rec, cfg.rollout.style)


def instruction_for(cfg: Config, kind: str) -> str:
    return self_correction_instruction(kind, cfg.rollout.style, cfg.rollout.instruction)


# ---------------------------------------------------------------------------- forward passes

def forward_pair(model, ref, batch: PackedBatch, cut: int, *, need_ref: bool, autocast: bool):
    """Policy hidden [N, d] (with grad) and reference hidden [N, d] (no grad, or None).
    The `cut` frozen bottom layers are identical in both models, so they run once, without a graph; not at all
    when the sampler already computed them (batch.prefix_hidden, captured at layer `cut`)."""
    dev = model.device
    ids, pos, cu = (batch.input_ids.to(dev), batch.position_ids.to(dev), batch.cu_seqlens.to(dev))
    ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if autocast else torch.autocast(dev.type, enabled=False)
    sampled = batch.prefix_hidden is not None and cut > 0 and batch.prefix_layer == cut
    with ctx:
        with torch.no_grad():  # [N, d] residual after layer cut-1
            prefix = batch.prefix_hidden.to(dev) if sampled else model(ids, pos, cu, to_layer=cut) if cut else None
        hidden = model(ids, pos, cu, from_layer=cut, hidden=prefix)
        ref_hidden = None
        if need_ref:
            with torch.no_grad():
                ref_hidden = ref(ids, pos, cu, from_layer=cut, hidden=prefix)
    return hidden, ref_hidden


def policy_logprobs(hidden, weight, batch: PackedBatch, temperature: float):
    """Fused log-probs of the policy tokens only (the lm_head is never applied to prompt tokens),
    scattered back to [N] fp32 (0 elsewhere). `temperature` is the sampling temperature: the sampler's
    distribution is softmax(logits / T), so policy, old and reference log-probs are all scored at T."""
    sel = (batch.turn_ids >= 0).to(hidden.device)
    return losses.selected_logprobs(hidden, weight, batch.targets.to(hidden.device), sel, temperature), sel


def training_temperature(cfg: Config) -> float:
    """The rollouts' sampling temperature, at which every training log-prob is scored. Greedy (0) rollouts
    have no log-probs to train on, so training needs T > 0."""
    return UpdateSettings.of(cfg).scoring_temperature(sft=False)


@dataclass(frozen=True)
class UpdateSettings:
    """What one optimisation step reads (from the config's rollout, algo, optim and model sections)."""
    temperature: float  # the rollouts' sampling temperature (RL turns are scored at it)
    epochs: int = 1
    clip_eps: float = 0.0
    kl: str = "k3"
    agg: str = "token-mean"
    micro_batch_tokens: int = 4096
    grad_clip: float = 1.0
    autocast_bf16: bool = False

    @classmethod
    def of(cls, cfg: Config) -> UpdateSettings:
        a, o = cfg.algo, cfg.optim
        return cls(temperature=float(cfg.rollout.temperature), epochs=o.epochs, clip_eps=a.clip_eps, kl=a.kl,
                   agg=a.agg, micro_batch_tokens=o.micro_batch_tokens, grad_clip=o.grad_clip,
                   autocast_bf16=cfg.model.autocast_bf16)

    def scoring_temperature(self, sft: bool) -> float:
        """SFT fits the untempered model (an NLL); RL scores at the sampling temperature, which must be > 0."""
        if sft:
            return 1.0
        if not self.temperature > 0:
            raise ValueError(f"rollout.temperature must be > 0 for training (the loss scores tokens at the sampling "
                             f"temperature), got {self.temperature}")
        return self.temperature


# ---------------------------------------------------------------------------- one optimisation step

@dataclass
class StepInputs:
    samples: list  # Episode, a prompt's n samples consecutive
    values: torch.Tensor  # [B, K] per-turn advantages (already zero on untrained turns)
    settings: algos.StageSettings


def old_logprobs(model, batches: list, st: algos.StageSettings, upd: UpdateSettings, cut: int, temp: float) -> list:
    """Per micro-batch [N] behaviour log-probs, or None each when the loss needs none (one epoch, no clipping).
    The behaviour policy is the sampler, and it does not change over the step's epochs: its own log-probs of
    the drawn tokens serve every epoch without a forward (they equal the trainer's at the sampling temperature:
    tests/test_trainer.py). The SFT baselines train on tokens this policy did not all draw (pair-SFT's built
    turn 2), at T=1: theirs are recomputed once, before the first update."""
    if upd.epochs == 1 and not upd.clip_eps > 0:
        return [None] * len(batches)
    if not st.sft:
        return [b.old_logprobs for b in batches]
    with torch.no_grad():
        return [policy_logprobs(forward_pair(model, None, b, cut, need_ref=False, autocast=upd.autocast_bf16)[0],
                                model.lm_head_weight, b, temp)[0] for b in batches]


def micro_batch(model, ref, b: PackedBatch, old, inp: StepInputs, upd: UpdateSettings, cut: int, temp: float,
                counts: losses.StepCounts, need_ref: bool):
    """Forward, fused log-probs and this micro-batch's share of the step loss -> (loss, stats)."""
    st, a = inp.settings, upd
    hidden, ref_hidden = forward_pair(model, ref, b, cut, need_ref=need_ref, autocast=upd.autocast_bf16)
    lp, sel = policy_logprobs(hidden, model.lm_head_weight, b, temp)  # read after forward: FSDP swaps in full weights
    dev = lp.device
    ref_lp = kl_tok = None
    if need_ref and a.kl == "exact":
        kl_tok = losses.exact_kl_tokens(hidden, model.lm_head_weight, ref_hidden, ref.lm_head_weight, sel, temp)
    elif need_ref:
        with torch.no_grad():
            ref_lp, _ = policy_logprobs(ref_hidden, ref.lm_head_weight, b, temp)
    return losses.micro_batch_loss(
        lp, packing.token_values(inp.values, b).to(dev), b.turn_ids.to(dev), b.cu_seqlens.to(dev), counts,
        num_turns=st.num_turns, kl_coef=st.kl_coef if need_ref else [0.0] * st.num_turns, agg=a.agg,
        old_lp=None if old is None else old.to(dev), ref_lp=ref_lp, kl_tokens=kl_tok,
        kl_estimator="k3" if a.kl == "exact" else a.kl, clip_eps=a.clip_eps)


def train_step(model, ref, optimizer, inp: StepInputs, upd: UpdateSettings, cut: int, *, dist_info=None) -> dict:
    """Optimisation pass(es) over one step's samples, in packed micro-batches. The loss is normalised by the
    step's policy tokens (token-mean) or sequences (seq-mean-*) counted over all ranks, and each rank's loss is
    its share of that global sum, so 2 ranks take the update of 1 process (distributed.grad_scale)."""
    info = dist_info or D.DistInfo()
    st = inp.settings
    temp = upd.scoring_temperature(st.sft)
    need_ref = ref is not None and any(c > 0 for c in st.kl_coef)
    batches = [packing.pack_samples([inp.samples[i] for i in g], rows=g)
               for g in packing.micro_batches(inp.samples, upd.micro_batch_tokens)]
    n_tok = sum(b.num_policy_tokens for b in batches)
    counts = losses.StepCounts(int(D.global_count(n_tok, info)), int(D.global_count(len(inp.samples), info)))
    passes = D.pad_passes(batches, info)  # None: a padding pass (same collectives, zero contribution)
    old = old_logprobs(model, batches, st, upd, cut, temp)
    trainable = [p for p in model.parameters() if p.requires_grad]
    stats_sum: dict[str, float] = {}
    t0 = time.perf_counter()
    total_loss = grad_norm = 0.0
    for _epoch in range(upd.epochs):
        optimizer.zero_grad(set_to_none=True)
        for j, b in enumerate(passes):
            pad = b is None
            loss, stats = micro_batch(model, ref, batches[0] if pad else b, old[0 if pad else j], inp, upd, cut,
                                      temp, counts, need_ref)
            loss = loss * (0.0 if pad else 1.0)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {float(loss)} in micro-batch {j}")
            (loss * D.grad_scale(info)).backward()  # FSDP averages gradients over ranks; a global-count loss sums
            if pad:
                continue
            total_loss += float(loss.detach())
            w = b.num_policy_tokens / max(n_tok, 1)
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + float(v.detach()) * (w if k.startswith(("kl", "clip", "ratio")) else 1.0)
        if upd.grad_clip > 0:
            gn = torch.nn.utils.clip_grad_norm_(trainable, upd.grad_clip)
            grad_norm = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"non-finite gradient norm {grad_norm}")
        optimizer.step()
    dt = time.perf_counter() - t0
    n_all = sum(len(b.input_ids) for b in batches)
    out = {"loss": total_loss / upd.epochs, "grad_norm": grad_norm, "policy_tokens": n_tok,
           "packed_tokens": n_all, "update_s": dt, "update_tokens_per_s": n_all * upd.epochs / max(dt, 1e-9)}
    for k in range(st.num_turns):
        if f"kl_turn{k}" in stats_sum:
            out[f"kl_t{k + 1}"] = stats_sum[f"kl_turn{k}"] / upd.epochs
    if "clip_frac" in stats_sum:
        out["clip_frac"] = stats_sum["clip_frac"] / upd.epochs
    return out


# ---------------------------------------------------------------------------- the run, in pieces

def build_models(cfg: Config, info, total: int):
    """-> (policy, tokenizer, frozen reference or None, first trainable layer). The reference is a frozen copy
    (with LoRA: the policy with its adapters off), made only when some stage has a KL term; under torchrun both
    are sharded (distributed.prepare)."""
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    model, tok = modeling.load_model(cfg.model.spec, dtype=dtype, device=info.device)
    cut = prepare_policy(model, cfg.model)
    a = cfg.algo
    needs_ref = a.name != "self-refine" and total > 0 and any(
        c > 0 for s, _ in algos.schedule(a) for c in algos.stage_settings(a, s).kl_coef)
    ref = None
    if needs_ref:
        ref = modeling.BaseView(model) if model.has_lora else copy.deepcopy(model).requires_grad_(False).eval()
    cut = D.prepare(model, ref, info, cut, engine=cfg.rollout.engine, shard_ref=cfg.dist.shard_ref,
                    activation_checkpointing=cfg.dist.activation_checkpointing)
    return model, tok, ref, cut


def make_optimizer(cfg: Config, model) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=cfg.optim.lr, betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2),
                             eps=cfg.optim.adam_eps, weight_decay=cfg.optim.weight_decay)


def resume_state(cfg: Config, ckpt_dir: str, model, optimizer) -> dict:
    """The run state to start from: fresh, or the latest complete checkpoint's (either layout, any rank count)."""
    state = {"step": 0, "data_pos": 0, "stage": None, "best_train_reward": None, "evals": []}
    if cfg.run.resume:
        path = checkpoint.latest(ckpt_dir)
        if path and D.is_sharded_checkpoint(path):  # written by a torchrun run, any number of ranks
            state = D.load_checkpoint(path, model, optimizer)
            state.pop("world_size", None)
            print(f"score-train: resumed from {path} (step {state['step']})", file=sys.stderr)
        elif path:
            state = checkpoint.load(path, model, optimizer)
            print(f"score-train: resumed from {path} (step {state['step']})", file=sys.stderr)
        else:
            print(f"score-train: nothing to resume in {ckpt_dir}; starting fresh", file=sys.stderr)
    return state


def optimise(model, ref, optimizer, ro, cfg: Config, cut: int, info, run_dir: str) -> dict:
    """One step's update on a RolloutBatch; a non-finite loss or gradient stops the run with a diagnostic file."""
    warm = max(cfg.optim.warmup_steps, 0)
    for g in optimizer.param_groups:  # the lr is a function of the step, so a resumed run gets the same one
        g["lr"] = cfg.optim.lr * (min(1.0, (ro.step + 1) / warm) if warm else 1.0)
    if not ro.train_samples:
        return {"loss": 0.0, "policy_tokens": 0, "update_s": 0.0}
    try:
        return train_step(model, ref, optimizer, StepInputs(ro.train_samples, ro.values, ro.settings),
                          UpdateSettings.of(cfg), cut, dist_info=info)
    except FloatingPointError as e:
        diag = os.path.join(run_dir, f"nan_diagnostic_step{ro.step}.pt")
        torch.save({"step": ro.step, "stage": ro.stage, "rewards": ro.rewards, "values": ro.values,
                    "samples": [s.__dict__ for s in ro.train_samples], "error": str(e)}, diag)
        raise RuntimeError(f"step {ro.step}: {e}. Stopped; diagnostic saved to {diag}. Try a lower "
                           "optim.lr, optim.grad_clip, or model.dtype=float32.") from e


def seed_process(cfg: Config) -> None:
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)


def checkpoint_due(cfg: Config, step: int, total: int, stage: str) -> bool:
    """Every run.save_every steps, at each stage boundary (the model each stage ends with is kept) and at the end."""
    return bool(cfg.run.save_every and step % cfg.run.save_every == 0) or step == total or \
        algos.stage_at(cfg.algo, step) != stage


def train(cfg: Config, *, fault_hook=None, reward_fn=None, rollout_hook=None) -> dict:
    """Run the configured algorithm. Returns the summary (also in <run>/summary.json).
    Test hooks, injected by the tests: fault_hook(step) runs after every step (raise in it to simulate a crash),
    reward_fn(record, text) replaces the task's reward, rollout_hook(step, info) runs after each step's sampling."""
    # 1. processes (torchrun: one per rank; else a no-op), seeds, the run directory
    t_start = time.perf_counter()
    info = D.init(cfg.dist.timeout_s, cfg.run.device)
    seed_process(cfg)
    run = open_run(cfg, main=info.is_main, ranks=info.world_size)  # inputs checked, resume rules; then the dir
    if run.finished is not None:
        return run.finished
    cfg, run_dir = run.cfg, D.broadcast_object(run.dir, info)
    total = algos.total_steps(cfg.algo)
    if total > 0:
        training_temperature(cfg)  # fail before loading anything

    # 2. the policy, its frozen reference, the rollout engine (it shares the policy's parameters), the data
    model, tok, ref, cut = build_models(cfg, info, total)
    rollout = build_rollout(cfg, model, tok)
    train_recs = load_records(cfg.data, "train", cfg.data.train_size) if total > 0 else []
    eval_recs = load_records(cfg.data, cfg.eval.split, cfg.data.eval_size)
    order = list(range(len(train_recs)))
    random.Random(cfg.data.seed + 1).shuffle(order)

    # 3. the optimiser and the state to start from
    optimizer = make_optimizer(cfg, model)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    state = resume_state(cfg, ckpt_dir, model, optimizer)
    t_start -= state.get("wall_s", 0.0)  # wall time covers every segment of a resumed run
    logger = Logger(run_dir if info.is_main else None, cfg, resume_step=state["step"])

    def run_eval(tag: str, step: int) -> dict:
        # every rank gathers the weights (a collective); rank 0 evaluates, the others wait
        with D.gathered(model):
            out = evaluate_run(rollout, eval_recs, cfg, tag, step, run_dir) if info.is_main else None
            if out is not None and tag in ("before", "after", "base"):
                print(f"eval {tag}: {fmt_eval(out)}", file=sys.stderr)
        state["evals"].append(D.broadcast_object(out, info))

    if state["step"] == 0 and cfg.eval.before and not any(e["tag"] == "before" for e in state["evals"]):
        run_eval("before", 0)

    # 4. per step: collect (rollouts, rewards, advantages) -> optimise -> log / eval / checkpoint
    bar = Progress(cfg, total, state["step"], info)
    rollouts = collect(cfg, rollout, model, tok, train_recs, order, start_step=state["step"],
                       data_pos=state["data_pos"], total=total, info=info, reward_fn=reward_fn or make_reward_fn(cfg),
                       instruction=instruction_for(cfg, (eval_recs or train_recs)[0].kind),
                       prompt_of=lambda r: prompt_of(cfg, r), hook=rollout_hook,
                       capture_layer=cut if cfg.rollout.reuse_prefix else 0)
    try:
        for ro in rollouts:
            upd = optimise(model, ref, optimizer, ro, cfg, cut, info, run_dir)
            step = ro.step + 1
            state.update(step=step, data_pos=ro.data_pos, stage=ro.stage, wall_s=time.perf_counter() - t_start)
            rec = step_record(ro, upd, optimizer.param_groups[0]["lr"], time.perf_counter() - t_start, info)
            logger.log(rec)
            bar.update(rec)
            if cfg.eval.sample_rows and info.is_main and (ro.step % max(1, total // 4) == 0 or step == total):
                write_train_samples(run_dir, ro, cfg.eval.sample_rows)
            if cfg.eval.every and step % cfg.eval.every == 0 and step < total:
                run_eval(f"step{step}", step)
            if checkpoint_due(cfg, step, total, ro.stage):
                D.save(ckpt_dir, step, model, optimizer, state, info, keep=cfg.run.keep_checkpoints)
            if fault_hook is not None:
                fault_hook(step)
    finally:
        bar.close()
        logger.close()

    # 5. the final evaluation, the export, the summary
    run_eval("after" if total else "base", total)
    if cfg.run.export and total > 0:
        D.export_hf(model, os.path.join(run_dir, "final_model"), tok, info,  # LoRA: merged into the weights
                    adapter_path=os.path.join(run_dir, "final_adapter") if model.has_lora else None)
        if info.is_main:  # the turn-2 text and budget it was trained with, which score-eval then uses
            trained_settings.write(os.path.join(run_dir, "final_model"), cfg)
    if not info.is_main:
        return {"run_dir": run_dir, "rank": info.rank}
    return write_summary(run_dir, cfg, total, t_start, state, info)

