"""GPU benchmark: one SCoRe Stage II step at the rollout shape, split per phase, with model FLOP utilisation.

The model and work are bench_engine's (random Qwen2.5-0.5B, bf16 parameters, 64 prompts x n=4,
512-token prompts, 256 + 256 new tokens; shapes.py gpu "score_step"). The step is the trainer's own
code, in `score-train`'s order (score_train/train.py `train`):
  1. rollouts      Engine.generate_ids, two turns (ids only: nothing here needs a tokenizer)
  2. rewards       synthetic Bernoulli(0.5) per turn (there is no text to grade; it costs nothing
                   on any machine)
  3. advantages    algos.turn_values (RLOO, shaping alpha)
  4. update        score_train.train.train_step: packed micro-batches, policy forward, frozen
                   reference forward, fused log-probs, policy_loss with the per-turn k3 KL,
                   backward, clip, AdamW
The update is timed twice: once as is (the step's time), once with a synchronising timer around
each phase (policy forward, reference forward, log-probs, loss, backward, optimiser) for the split;
the split's sum is printed beside the plain time so the timers' own cost shows.

Model FLOPs (for MFU): 2 x (matmul parameters) per token processed forward, 6 x for trained tokens
(forward + backward), the lm_head counted only where logits are formed (sampled positions in the
rollouts, policy tokens in training), plus causal attention 4 x layers x heads x head_dim per
(query, key) pair (x 3 when trained). MFU = model FLOPs / time / the bf16 peak calibrated in the run.
"""
from __future__ import annotations

import contextlib
import copy
import time

import torch

from benchmarks import gpu_timing as gt
from benchmarks.gpu.bench_engine import random_model, random_work, work_shape

OP = "score_step"
MICRO_BATCH_TOKENS = 16384  # packed tokens per forward/backward on the GPU (the CPU default is 4096)


class PhaseTimer:
    """Wall time per named phase, each call bracketed by device syncs (so GPU work is attributed to
    the phase that launched it)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, name, fn):
        def timed(*a, **k):
            label = name(*a, **k) if callable(name) else name
            gt.sync()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                gt.sync()
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t0
                self.calls[label] = self.calls.get(label, 0) + 1
        return timed


@contextlib.contextmanager
def timed_phases(model, ref, opt, timer: PhaseTimer):
    """Patches, for the duration, the calls train_step makes into timed ones. Benchmark-only: the
    trainer is run unmodified; its module globals and these objects are restored afterwards."""
    import score_kernels
    from score_train import train as T

    saved = []

    def patch(obj, attr, new):
        saved.append((obj, attr, obj.__dict__.get(attr, None) if isinstance(obj, torch.nn.Module) else getattr(obj, attr)))
        setattr(obj, attr, new)

    grad_label = lambda base: (lambda *a, **k: base if torch.is_grad_enabled() else f"{base} (no grad)")
    patch(model, "forward", timer.wrap(grad_label("policy fwd"), model.forward))
    if ref is not None:
        patch(ref, "forward", timer.wrap("reference fwd", ref.forward))
    patch(T, "policy_logprobs", timer.wrap(grad_label("log-probs"), T.policy_logprobs))
    patch(score_kernels, "policy_loss", timer.wrap("policy_loss", score_kernels.policy_loss))
    patch(score_kernels, "linear_kl", timer.wrap("linear_kl", score_kernels.linear_kl))
    patch(torch.Tensor, "backward", timer.wrap("backward", torch.Tensor.backward))
    patch(torch.nn.utils, "clip_grad_norm_", timer.wrap("clip + AdamW", torch.nn.utils.clip_grad_norm_))
    patch(opt, "step", timer.wrap("clip + AdamW", opt.step))
    try:
        yield timer
    finally:
        for obj, attr, old in reversed(saved):
            if isinstance(obj, torch.nn.Module) and old is None:
                delattr(obj, attr)  # back to the class's forward
            else:
                setattr(obj, attr, old)


def _matmul_params(model) -> tuple[int, int]:
    """(decoder-layer matmul parameters, lm_head parameters)."""
    body = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n and "lm_head" not in n)
    cfg = model.config
    return body, cfg.vocab_size * cfg.hidden_size


def _attn_flops(model, pairs: float) -> float:
    cfg = model.config
    return 4 * cfg.num_hidden_layers * cfg.num_attention_heads * model.head_dim * pairs


def rollout_flops(model, samples, stats) -> float:
    body, head = _matmul_params(model)
    processed = sum(v for k, v in stats.items()  # the engine's per-phase token counts
                    if k == "prompt_prefill" or (k.startswith("turn") and k.endswith(("_decode", "_extend"))))
    if not processed:  # an engine without those counters: every token once
        processed = sum(len(s.prompt_ids) + len(s.turn1_ids) + len(s.instruction_ids or []) + len(s.turn2_ids or [])
                        for s in samples)
    sampled = sum(len(s.turn1_ids) + len(s.turn2_ids or []) for s in samples)
    pairs = sum(_causal_pairs(s) for s in samples)  # an upper bound: the prompt is prefilled once per group
    return 2 * body * processed + 2 * head * sampled + _attn_flops(model, pairs)


def _causal_pairs(s) -> float:
    T = len(s.prompt_ids) + len(s.turn1_ids) + len(s.instruction_ids or []) + len(s.turn2_ids or [])
    return T * (T + 1) / 2


def update_flops(model, samples, with_ref: bool) -> float:
    body, head = _matmul_params(model)
    packed = sum(len(s.prompt_ids) + len(s.turn1_ids) + len(s.instruction_ids or []) + len(s.turn2_ids or [])
                 for s in samples)
    policy = sum(len(s.turn1_ids) + len(s.turn2_ids or []) for s in samples)
    pairs = sum(_causal_pairs(s) for s in samples)
    f = 6 * body * packed + 6 * head * policy + 3 * _attn_flops(model, pairs)
    if with_ref:
        f += 2 * body * packed + 2 * head * policy + _attn_flops(model, pairs)
    return f


def synthetic_samples(prompts, suffix, n: int, M: int):
    """What the rollouts would return, EOS off: every turn M random ids (when the engine fails)."""
    from score_train.rollout.types import Episode
    g = torch.Generator().manual_seed(3)
    out = []
    for i, p in enumerate(prompts):
        for j in range(n):
            y1, y2 = (torch.randint(10, max(p) + 1, (M,), generator=g).tolist() for _ in range(2))
            out.append(Episode(prompt_index=i, sample_index=j, prompt_ids=list(p), turn1_ids=y1,
                                     turn1_logprobs=[-1.0] * M, turn1_text="", finish_reasons=["length"] * 2,
                                     instruction_ids=list(suffix), turn2_ids=y2, turn2_logprobs=[-1.0] * M,
                                     turn2_text=""))
    return out


def run(quick: bool = False):
    from score_train import algos
    from score_train.config import Config
    from score_train.rollout.engine import Engine
    from score_train.rollout.types import SamplingParams
    from score_train.train import StepInputs, UpdateSettings, set_trainable, train_step

    sh = work_shape("score_step")
    if quick:
        sh.update(prompts=min(sh["prompts"], 16), max_new_tokens=min(sh["max_new_tokens"], 64))
    P, n, L, M = sh["prompts"], sh["n"], sh["prompt_len"], sh["max_new_tokens"]
    desc = f"{P}x{n} L={L} {M}+{M}"
    peak = gt.calibrate()["matmul_bf16_tflops"] * 1e12
    cfg = Config()
    cfg.algo.name = "score"
    cfg.optim.micro_batch_tokens = MICRO_BATCH_TOKENS if gt.on_gpu() else 512
    st = algos.stage_settings(cfg.algo, "stage2")
    model = random_model()
    cut = set_trainable(model, cfg.model.train_layers, cfg.model.train_embeddings)
    ref = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    prompts, suffix = random_work(model.config, P, L)
    eng = Engine(model, None, eos_token_ids=set())
    g = torch.Generator().manual_seed(2)

    def step_inputs(samples):
        rewards = torch.randint(0, 2, (len(samples), 2), generator=g).float()
        values = algos.turn_values(st, rewards, algos.group_ids(samples), estimator=cfg.algo.estimator,
                                   std_normalize=cfg.algo.std_normalize)
        return StepInputs(samples=samples, values=values, settings=st)

    # warm-up: every kernel of rollouts and update compiles outside the timing. A broken engine costs
    # the rollout rows only: the update is then timed on synthetic samples of the same lengths.
    roll_err, t_roll, roll_stats = None, None, {}
    try:
        model.eval()
        warm = eng.generate_ids(prompts[:2], SamplingParams(n=n, max_new_tokens=3), suffixes=[suffix] * 2)
    except Exception as e:  # noqa: BLE001
        roll_err, warm = e, synthetic_samples(prompts[:2], suffix, n, 3)
    model.train()
    train_step(model, ref, opt, step_inputs(warm), UpdateSettings.of(cfg), cut)
    gt.sync()

    # 1. rollouts
    if roll_err is None:
        try:
            model.eval()
            t0 = time.perf_counter()
            samples = eng.generate_ids(prompts, SamplingParams(n=n, temperature=1.0, max_new_tokens=M, seed=0),
                                       suffixes=[suffix] * P)
            gt.sync()
            t_roll = time.perf_counter() - t0
            roll_stats = dict(eng.stats)
        except Exception as e:  # noqa: BLE001
            roll_err = e
    if roll_err is not None:
        yield gt.error_row(OP, desc, "1 rollouts", roll_err)
        samples = synthetic_samples(prompts, suffix, n, M)
    # the engine keeps its KV pool between steps (as in the trainer), so the update runs beside it
    # 2-3. rewards, advantages
    t0 = time.perf_counter()
    inp = step_inputs(samples)
    t_adv = time.perf_counter() - t0
    # 4. update, as is
    model.train()
    if gt.on_gpu():
        torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated() if gt.on_gpu() else None
    t0 = time.perf_counter()
    out = train_step(model, ref, opt, inp, UpdateSettings.of(cfg), cut)
    gt.sync()
    t_upd = time.perf_counter() - t0
    upd_mem = (torch.cuda.max_memory_allocated() - base_mem) / 1e9 if gt.on_gpu() else None
    # 4'. update again, phases timed
    timer = PhaseTimer()
    t0 = time.perf_counter()
    with timed_phases(model, ref, opt, timer):
        train_step(model, ref, opt, inp, UpdateSettings.of(cfg), cut)
    gt.sync()
    t_upd_timed = time.perf_counter() - t0

    total = (t_roll or 0.0) + t_adv + t_upd
    f_roll = rollout_flops(model, samples, roll_stats) if t_roll else 0.0
    need_ref = any(c > 0 for c in st.kl_coef)
    f_upd = update_flops(model, samples, need_ref)
    gen = sum(len(s.turn1_ids) + len(s.turn2_ids or []) for s in samples)

    def phase_row(variant, secs, flops=None, **extra):
        r = {"op": OP, "shape": desc, "variant": variant, "ms": secs * 1e3, "share_of_step": secs / total}
        if flops:
            r["tflops"] = flops / secs / 1e12
            r["frac_peak"] = flops / secs / peak
        r.update(extra)
        share = f"{100 * secs / total:.0f}% of step, " if variant != "step" else ""
        r["note"] = (share + (f"MFU {100 * r['frac_peak']:.0f}%" if flops else "")).strip(", ")
        return r

    yield phase_row("step" if t_roll else "step without rollouts", total, f_roll + f_upd,
                    mfu=(f_roll + f_upd) / total / peak, packed_tokens=out.get("packed_tokens"), generated=gen)
    if t_roll:
        yield phase_row("1 rollouts", t_roll, f_roll, tokens_per_s=gen / t_roll)
    yield phase_row("2-3 rewards+advantages", t_adv)
    yield phase_row("4 update (train_step)", t_upd, f_upd, extra_mem_gb=upd_mem,
                    tokens_per_s=out.get("packed_tokens", 0) / t_upd)
    for name, secs in sorted(timer.seconds.items(), key=lambda kv: -kv[1]):
        yield {"op": OP, "shape": desc, "variant": f"  4: {name}", "ms": secs * 1e3,
               "share_of_update": secs / t_upd_timed, "calls": timer.calls[name],
               "note": f"{100 * secs / t_upd_timed:.0f}% of the timed update, {timer.calls[name]} calls"}
    rest = t_upd_timed - sum(timer.seconds.values())
    yield {"op": OP, "shape": desc, "variant": "  4: other (packing, host)", "ms": rest * 1e3,
           "share_of_update": rest / t_upd_timed,
           "note": f"timed update {t_upd_timed * 1e3:.0f} ms vs {t_upd * 1e3:.0f} ms plain"}
