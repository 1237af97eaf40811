"""`score-train`: SCoRe (Stage I -> Stage II) and its baselines, from one YAML config.

The loop, top to bottom (see `train`):

    for each step:
        1. two-turn rollouts of this step's prompts through the engine (it shares the policy's parameters,
           so it always samples from the current weights)
        2. rewards per turn                                       [B, K]
        3. per-turn advantages (shaping, group baseline)          [B, K]  (SFT baselines: 1 on kept turns)
        4. optimisation pass(es) over packed micro-batches: hidden states -> fused log-probs ->
           policy_loss (PG + per-turn KL against the frozen reference), token-mean over the step
        5. log a metrics line, checkpoint, evaluate at intervals

Distributed training (issue 8) wraps `train_step`: it takes world_size/rank and the global token
count explicitly, and the n samples of one prompt always stay together.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import torch

from score_train import algos, checkpoint
from score_train.cli import TRAIN_USAGE as USAGE  # noqa: F401 - re-exported (score_train.train.USAGE)
from score_train.cli import train_main as main
from score_train.config import Config
from score_train.eval import evaluate_run, fmt_eval, write_samples
from score_train.rollout.types import SamplingParams
from score_train.rundir import Logger, open_run, prepare_run_dir  # noqa: F401 - prepare_run_dir re-exported


def _ops():
    import score_kernels

    return score_kernels


# ---------------------------------------------------------------------------- set-up helpers

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def records_for(cfg: Config, split: str, n: int):
    from score_train.data import ArithmeticConfig, load_task

    arith = None
    if cfg.data.task == "arithmetic":
        arith = ArithmeticConfig(digits=cfg.data.digits, n_operands=cfg.data.n_operands, ops=tuple(cfg.data.ops),
                                 prompt_format=cfg.data.prompt_format)
    return load_task(cfg.data.task, split, n, cfg.data.seed, arithmetic=arith)


def make_reward_fn(cfg: Config):
    """reward(record, text) -> 0/1 by the record's kind."""
    from score_train.rewards import reward as task_reward

    if os.environ.get("SCORE_TEST_REWARD") == "hash":
        # test-only: a deterministic 0/1 reward, so that tiny random models in subprocess tests (torchrun) get
        # non-zero advantages; the in-process tests monkeypatch this function instead
        import hashlib

        return lambda rec, text: float(hashlib.md5(f"{rec.id}|{text}".encode()).digest()[0] % 2)
    return lambda rec, text: task_reward(rec.kind, text, rec)


def make_rollout(cfg: Config, model, tokenizer):
    if cfg.rollout.engine == "engine":
        from score_train.rollout.engine import Engine

        return Engine(model, tokenizer)
    from score_train.rollout.hf_baseline import HFRollout

    return HFRollout(model, tokenizer)


def prompt_of(cfg: Config, rec) -> str:
    from score_train.prompts import turn1_message

    return turn1_message(rec, cfg.rollout.style)


def instruction_for(cfg: Config, kind: str) -> str:
    from score_train.prompts import self_correction_instruction

    return self_correction_instruction(kind, cfg.rollout.style)


# ---------------------------------------------------------------------------- forward passes

def _layer(layer, x, cos, sin, cu, max_len, scale):
    from score_train.model import _packed_attention

    h = layer.input_layernorm(x)
    q, k, v = layer.self_attn.qkv(h, cos, sin)
    a = _packed_attention(q, k, v, cu, max_len, scale)
    x = x + layer.self_attn.o_proj(a.reshape(x.shape[0], -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def forward_pair(model, ref, batch: algos.PackedBatch, cut: int, *, need_ref: bool, autocast: bool):
    """Policy hidden [N, d] (with grad) and reference hidden [N, d] (no grad, or None).
    The `cut` frozen bottom layers are identical in both models, so they run once, without a graph."""
    dev = model.device
    ids, pos, cu = (batch.input_ids.to(dev), batch.position_ids.to(dev), batch.cu_seqlens.to(dev))
    max_len = int((batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).max())
    ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if autocast else torch.autocast(dev.type, enabled=False)
    with ctx:
        if cut == 0:
            hidden = model(ids, pos, cu)
            ref_hidden = None
            if need_ref:
                with torch.no_grad():
                    ref_hidden = ref(ids, pos, cu)
            return hidden, ref_hidden
        with torch.no_grad():
            x = model.model.embed_tokens(ids)
            cos, sin = model._rope(pos, x.dtype)
            for layer in model.model.layers[:cut]:
                x = _layer(layer, x, cos, sin, cu, max_len, model.scale)
        h = x
        for layer in model.model.layers[cut:]:
            h = _layer(layer, h, cos, sin, cu, max_len, model.scale)
        hidden = model.model.norm(h)
        ref_hidden = None
        if need_ref:
            with torch.no_grad():
                r = x
                for layer in ref.model.layers[cut:]:
                    r = _layer(layer, r, cos, sin, cu, max_len, ref.scale)
                ref_hidden = ref.model.norm(r)
    return hidden, ref_hidden


def policy_logprobs(hidden, weight, batch: algos.PackedBatch, temperature: float):
    """Fused log-probs of the policy tokens only (the lm_head is never applied to prompt tokens),
    scattered back to [N] fp32 (0 elsewhere). `temperature` is the sampling temperature: the sampler's
    distribution is softmax(logits / T), so policy, old and reference log-probs are all scored at T."""
    ops = _ops()
    sel = (batch.turn_ids >= 0).to(hidden.device)
    lp = ops.linear_logprobs(hidden[sel], weight, batch.targets.to(hidden.device)[sel], temperature=temperature)
    full = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    return full.masked_scatter(sel, lp.float()), sel


def training_temperature(cfg: Config) -> float:
    """The rollouts' sampling temperature, at which every training log-prob is scored. Greedy (0) rollouts
    have no log-probs to train on, so training needs T > 0."""
    t = float(cfg.rollout.temperature)
    if not t > 0:
        raise ValueError(f"rollout.temperature must be > 0 for training (the loss scores tokens at the sampling "
                         f"temperature), got {t}")
    return t


# ---------------------------------------------------------------------------- one optimisation step

@dataclass
class StepInputs:
    samples: list  # TwoTurnSample, a prompt's n samples consecutive
    values: torch.Tensor  # [B, K] per-turn advantages (already zero on untrained turns)
    settings: algos.StageSettings


def train_step(model, ref, optimizer, inp: StepInputs, cfg: Config, cut: int, *,
               world_size: int = 1, rank: int = 0, global_token_count: int | None = None,
               global_seq_count: int | None = None, reduce_grads=None, dist_info=None) -> dict:
    """Optimisation pass(es) over one step's samples. The loss is normalised by the global number of
    policy tokens (token-mean) or sequences (seq-mean-*), so a distributed caller passes the counts of
    all ranks and `reduce_grads` (an all-reduce of the gradients) and gets the same update."""
    ops = _ops()
    st, a = inp.settings, cfg.algo
    kl_mode = a.kl
    need_ref = ref is not None and any(c > 0 for c in st.kl_coef)
    groups = algos.micro_batches(inp.samples, cfg.optim.micro_batch_tokens)
    batches = [algos.pack_samples([inp.samples[i] for i in g], rows=g) for g in groups]
    n_tok = sum(b.num_policy_tokens for b in batches)
    gtc = global_token_count if global_token_count is not None else n_tok
    gsc = global_seq_count if global_seq_count is not None else len(inp.samples)
    gscale = 1.0
    if dist_info is not None and dist_info.enabled:
        from score_train import distributed as D

        # global normalisers, and the same number of forward/backward passes on every rank: FSDP's collectives
        # run per pass, so a rank with fewer micro-batches replays its first one with zero weight.
        gtc, gsc = int(D.global_count(n_tok, dist_info)), int(D.global_count(len(inp.samples), dist_info))
        n_passes = D.all_max(len(batches), dist_info)
        batches = batches + [None] * (n_passes - len(batches))
        gscale = D.grad_scale(dist_info)
    K = st.num_turns
    # SFT baselines fit the untempered model (an NLL); the RL losses score at the sampling temperature
    temp = 1.0 if st.sft else training_temperature(cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    use_old = cfg.optim.epochs > 1 or a.clip_eps > 0
    old = [None] * len(batches)
    if use_old:  # the behaviour policy's log-probs, from the trainer's own forward (not the sampler's)
        with torch.no_grad():
            for j, b in enumerate(batches):
                h, _ = forward_pair(model, None, b or batches[0], cut, need_ref=False,
                                    autocast=cfg.model.autocast_bf16)
                old[j] = policy_logprobs(h, model.lm_head_weight, b or batches[0], temp)[0]
    stats_sum: dict[str, float] = {}
    t0 = time.perf_counter()
    total_loss = 0.0
    grad_norm = 0.0
    for _epoch in range(cfg.optim.epochs):
        optimizer.zero_grad(set_to_none=True)
        for j, b in enumerate(batches):
            pad = b is None  # a padding pass (distributed): same collectives, zero contribution
            b = batches[0] if pad else b
            hidden, ref_hidden = forward_pair(model, ref, b, cut, need_ref=need_ref, autocast=cfg.model.autocast_bf16)
            lp, sel = policy_logprobs(hidden, model.lm_head_weight, b, temp)  # read after forward: FSDP swaps in full weights
            dev = lp.device
            adv = algos.token_values(inp.values, b).to(dev)
            tids = b.turn_ids.to(dev)
            cu = b.cu_seqlens.to(dev)
            kw = {"old_logprobs": old[j], "clip_eps": a.clip_eps or None, "agg": a.agg, "cu_seqlens": cu,
                  "num_turns": K}
            if a.agg == "token-mean":
                kw["global_token_count"] = gtc
                scale = 1.0
            else:  # seq-mean-*: the op averages over this micro-batch's sequences; rescale to the step
                scale = (len(b.cu_seqlens) - 1) / gsc
            exact_kl = None
            if need_ref and kl_mode == "exact":
                coef = algos.kl_coef_tokens(st, b).to(dev)[sel]
                kl_tok = ops.linear_kl(hidden[sel], model.lm_head_weight, ref_hidden[sel], ref.lm_head_weight,
                                       temperature=temp)
                exact_kl = (coef * kl_tok).sum() / (gtc if a.agg == "token-mean" else max(n_tok, 1))
                loss, stats = ops.policy_loss(lp, adv, tids, kl_coef=[0.0] * K, **kw)
                loss = loss + exact_kl
                for k in range(K):
                    m = tids[sel] == k
                    stats[f"kl_turn{k}"] = kl_tok[m].mean() if m.any() else torch.zeros(())
            elif need_ref:
                with torch.no_grad():
                    ref_lp, _ = policy_logprobs(ref_hidden, ref.lm_head_weight, b, temp)
                loss, stats = ops.policy_loss(lp, adv, tids, ref_logprobs=ref_lp, kl_coef=list(st.kl_coef),
                                              kl_estimator=kl_mode, **kw)
            else:
                loss, stats = ops.policy_loss(lp, adv, tids, kl_coef=[0.0] * K, **kw)
            loss = loss * (0.0 if pad else scale)  # this rank's share of the global loss (ranks sum to it)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {float(loss)} in micro-batch {j}")
            (loss * gscale).backward()  # FSDP averages gradients over ranks; a global-count loss must sum
            if pad:
                continue
            total_loss += float(loss.detach())
            w = b.num_policy_tokens / max(n_tok, 1)
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + float(v.detach()) * (w if k.startswith(("kl", "clip", "ratio")) else 1.0)
        if reduce_grads is not None:
            reduce_grads(trainable)
        if cfg.optim.grad_clip > 0:
            gn = torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip)
            grad_norm = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"non-finite gradient norm {grad_norm}")
        optimizer.step()
    dt = time.perf_counter() - t0
    batches = [b for b in batches if b is not None]
    n_all = sum(len(b.input_ids) for b in batches)
    out = {"loss": total_loss / cfg.optim.epochs, "grad_norm": grad_norm, "policy_tokens": n_tok,
           "packed_tokens": n_all, "update_s": dt, "update_tokens_per_s": n_all * cfg.optim.epochs / max(dt, 1e-9)}
    for k in range(K):
        if f"kl_turn{k}" in stats_sum:
            out[f"kl_t{k + 1}"] = stats_sum[f"kl_turn{k}"] / cfg.optim.epochs
    if "clip_frac" in stats_sum:
        out["clip_frac"] = stats_sum["clip_frac"] / cfg.optim.epochs
    return out


# ---------------------------------------------------------------------------- the run

def step_seed(cfg: Config, step: int) -> int:
    return (cfg.run.seed * 1_000_003 + step * 7919 + 17) % (2**31)


def train(cfg: Config, *, fault_hook=None) -> dict:
    """Run the configured algorithm. Returns the summary (also in <run>/summary.json).
    fault_hook(step) is called after every step (tests raise in it to simulate a crash)."""
    from score_train import distributed as D
    from score_train.model import load_model

    t_start = time.perf_counter()
    info = D.init(cfg.dist.timeout_s, cfg.run.device)  # torchrun: one process per rank; else a no-op
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    run = open_run(cfg, main=info.is_main, ranks=info.world_size)  # inputs checked, resume rules; then the dir
    if run.finished is not None:
        return run.finished
    cfg, run_dir = run.cfg, D.broadcast_object(run.dir, info)

    device = info.device if info.enabled else pick_device(cfg.run.device)
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    model, tok = load_model(cfg.model.spec, dtype=dtype, device=device)
    cut = set_trainable(model, cfg.model.train_layers, cfg.model.train_embeddings)
    a = cfg.algo
    schedule = algos.schedule(a)
    total = algos.total_steps(a)
    needs_ref = a.name != "self-refine" and total > 0 and any(
        c > 0 for s, _ in schedule for c in algos.stage_settings(a, s).kl_coef)
    ref = None
    if needs_ref:  # frozen copy; the frozen bottom layers are shared at run time anyway
        ref = copy.deepcopy(model).requires_grad_(False).eval()
    if info.enabled:  # FSDP2: the policy per decoder layer, the reference too unless replicated
        if cfg.rollout.engine != "engine":
            raise ValueError("distributed training needs rollout.engine=engine")
        cut = 0  # every layer through the model's own forward, so FSDP's hooks see it
        D.shard(model, activation_checkpointing=cfg.dist.activation_checkpointing)
        if ref is not None and cfg.dist.shard_ref:
            D.shard(ref)
    rollout = make_rollout(cfg, model, tok)
    reward_fn = make_reward_fn(cfg)
    train_recs = records_for(cfg, "train", cfg.data.train_size) if total > 0 else []
    eval_recs = records_for(cfg, "eval", cfg.data.eval_size)
    order = list(range(len(train_recs)))
    random.Random(cfg.data.seed + 1).shuffle(order)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2),
                                  weight_decay=cfg.optim.weight_decay)
    warm = max(cfg.optim.warmup_steps, 0)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
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
    t_start -= state.get("wall_s", 0.0)  # wall time covers every segment of a resumed run
    logger = Logger(run_dir if info.is_main else None, cfg, resume_step=state["step"])
    kind = (eval_recs or train_recs)[0].kind
    instr = instruction_for(cfg, kind)

    def run_eval(tag: str, step: int) -> dict:
        # every rank gathers the weights (a collective); rank 0 evaluates, the others wait
        with D.gathered(model):
            out = evaluate_run(rollout, eval_recs, cfg, tag, step, run_dir) if info.is_main else None
        return D.broadcast_object(out, info)

    if state["step"] == 0 and cfg.eval.before and not any(e["tag"] == "before" for e in state["evals"]):
        state["evals"].append(run_eval("before", 0))
        if info.is_main:
            print(f"eval before: {fmt_eval(state['evals'][-1])}", file=sys.stderr)

    bar = None
    if cfg.run.progress and total > 0 and info.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=state["step"], desc=a.name, dynamic_ncols=True)
    P, n = cfg.rollout.prompts_per_step, cfg.rollout.n
    try:
        for step in range(state["step"], total):
            stage = algos.stage_at(a, step)
            st = algos.stage_settings(a, stage)
            # 1. rollouts: this step's prompts, the n samples of each together
            pos = state["data_pos"]
            mine = D.shard_prompts(P, info)  # this rank's prompts (all of them in one process)
            recs = [train_recs[order[(pos + i) % len(order)]] for i in mine]
            params = SamplingParams(n=n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                    max_new_tokens=cfg.rollout.max_new_tokens, seed=step_seed(cfg, step))
            t0 = time.perf_counter()
            model.eval()
            err, samples, rewards = None, [], None
            try:
                kw = {}
                if info.enabled:  # seeds by global prompt index: the same samples whatever the rank count
                    from score_train.rollout.engine import sample_seed

                    kw["seeds"] = [sample_seed(params.seed, i, j) for i in mine for j in range(n)]
                with D.gathered(model):
                    samples = rollout.generate([prompt_of(cfg, r) for r in recs], params, two_turn=st.two_turn,
                                               instruction=instr, **kw)
                if os.environ.get("SCORE_TEST_FAIL_ROLLOUT_RANK") == str(info.rank):  # test-only failure injection
                    raise RuntimeError(f"injected rollout failure on rank {info.rank}")
                # 2. rewards [B, K]
                rewards = algos.reward_table(samples, reward_fn, recs, st.rollout_turns)
            except Exception as e:  # noqa: BLE001 - re-raised on every rank by the barrier below
                err = e
            D.all_ok(err, info)  # a failed rank stops every rank, with its message
            t_roll = time.perf_counter() - t0
            gen_tokens = sum(len(s.turn1_ids) + len(s.turn2_ids or []) for s in samples)
            # 3. advantages [B, K]
            train_samples, values = samples, None
            if st.sft:
                if a.name == "star":
                    keep = algos.star_select(rewards, a.star_keep_correct)
                    train_samples = [samples[i] for i in keep]
                else:
                    # the instruction ids that follow each wrong y1, from the chat template (token ids only)
                    from score_train.prompts import ChatFormat, eos_ids_of

                    chat, eos = ChatFormat(tok), eos_ids_of(model, tok)
                    suffix = [chat.suffix_ids(prompt_of(cfg, r), instr) for r in recs]
                    train_samples = algos.pair_sft_build(
                        samples, rewards,
                        lambda s, suffix=suffix, eos=eos: ChatFormat.instruction_ids(suffix[s.prompt_index], s.turn1_ids, eos))
                values = algos.sft_values(len(train_samples), st)
            else:
                values = algos.turn_values(st, rewards, algos.group_ids(samples), estimator=a.estimator,
                                           std_normalize=a.std_normalize)
            # 4. optimisation (the lr is a function of the step, so a resumed run gets the same one)
            for g in optimizer.param_groups:
                g["lr"] = cfg.optim.lr * (min(1.0, (step + 1) / warm) if warm else 1.0)
            model.train()
            upd = {"loss": 0.0, "policy_tokens": 0, "update_s": 0.0}
            if train_samples:
                try:
                    upd = train_step(model, ref, optimizer, StepInputs(train_samples, values, st), cfg, cut,
                                     world_size=info.world_size, rank=info.rank, dist_info=info)
                except FloatingPointError as e:
                    diag = os.path.join(run_dir, f"nan_diagnostic_step{step}.pt")
                    torch.save({"step": step, "stage": stage, "rewards": rewards, "values": values,
                                "samples": [s.__dict__ for s in train_samples], "error": str(e)}, diag)
                    raise RuntimeError(f"step {step}: {e}. Stopped; diagnostic saved to {diag}. Try a lower "
                                       "optim.lr, optim.grad_clip, or model.dtype=float32.") from e
            state["data_pos"] = pos + P
            state["step"] = step + 1
            state["stage"] = stage
            state["wall_s"] = time.perf_counter() - t_start
            # 5. log
            r1 = float(rewards[:, 0].mean())
            rec = {"step": step + 1, "stage": stage, "reward_t1": r1, "lr": optimizer.param_groups[0]["lr"],
                   "rollout_s": t_roll, "gen_tokens": gen_tokens, "gen_tokens_per_s": gen_tokens / max(t_roll, 1e-9),
                   "kept_samples": len(train_samples), **upd}
            if st.rollout_turns > 1:
                rec["reward_t2"] = float(rewards[:, 1].mean())
                rec["i2c"] = float(((rewards[:, 0] < 0.5) & (rewards[:, 1] > 0.5)).float().mean())
                rec["c2i"] = float(((rewards[:, 0] > 0.5) & (rewards[:, 1] < 0.5)).float().mean())
            rec["elapsed_s"] = time.perf_counter() - t_start
            if info.enabled:
                rec = D.all_mean_metrics(rec, info, keep=("step", "lr"), sum_keys=(
                    "loss", "gen_tokens", "gen_tokens_per_s", "kept_samples", "policy_tokens", "packed_tokens",
                    "update_tokens_per_s"))
            logger.log(rec)
            if cfg.eval.sample_rows and (step % max(1, total // 4) == 0 or step + 1 == total):
                write_samples(os.path.join(run_dir, f"samples_train_step{step + 1}.md"),
                              [{"problem": recs[s.prompt_index].problem, "y1": s.turn1_text, "y2": s.turn2_text,
                                "r1": float(rewards[i, 0]),
                                "r2": float(rewards[i, 1]) if st.rollout_turns > 1 else None}
                               for i, s in enumerate(samples[: cfg.eval.sample_rows])])
            if bar is not None:
                bar.update(1)
                post = {"stage": stage, "r1": f"{r1:.2f}"}
                if "reward_t2" in rec:
                    post["r2"] = f"{rec['reward_t2']:.2f}"
                if "kl_t1" in rec:
                    post["kl"] = f"{rec.get('kl_t1', 0):.3g}/{rec.get('kl_t2', 0):.3g}"
                tokens = rec.get("packed_tokens", 0) + gen_tokens
                post["tok/s"] = f"{tokens / max(rec['update_s'] + t_roll, 1e-9):.0f}"
                bar.set_postfix(post)
            last = step + 1 == total
            stage_end = last or algos.stage_at(a, step + 1) != stage
            if cfg.eval.every and (step + 1) % cfg.eval.every == 0 and not last:
                state["evals"].append(run_eval(f"step{step + 1}", step + 1))
            if (cfg.run.save_every and (step + 1) % cfg.run.save_every == 0) or stage_end:
                if info.enabled:
                    D.save_checkpoint(ckpt_dir, step + 1, model, optimizer, state, info,
                                      keep=cfg.run.keep_checkpoints)
                else:
                    checkpoint.save(ckpt_dir, step + 1, model, optimizer, state, keep=cfg.run.keep_checkpoints)
            if fault_hook is not None:
                fault_hook(step + 1)
    finally:
        if bar is not None:
            bar.close()
        logger.close()

    final = run_eval("after" if total else "base", total)
    state["evals"].append(final)
    if cfg.run.export and total > 0:
        D.export_hf(model, os.path.join(run_dir, "final_model"), tok, info)
    if not info.is_main:
        return {"run_dir": run_dir, "rank": info.rank}
    print(f"eval {final['tag']}: {fmt_eval(final)}", file=sys.stderr)
    summary = {"run_dir": run_dir, "algo": a.name, "steps": total, "wall_s": time.perf_counter() - t_start,
               "evals": state["evals"], "threads": torch.get_num_threads(), "device": str(device)}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    try:
        from score_train import report

        report.write_report(run_dir)
    except ImportError as e:  # matplotlib is optional
        print(f"report skipped: {e}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    sys.exit(main())
