"""GPU benchmark: two-turn rollouts, the paged engine vs Hugging Face, on a random Qwen2.5-0.5B (bf16).

Work (benchmarks/shapes.py gpu "rollout"): 64 prompts x n=4, 512-token random prompts (token ids,
no tokenizer), 256 + 256 new tokens, temperature 1.0, EOS disabled so every sample generates its
budget. The model is built from a Qwen2Config (hidden 896, 24 layers, 14/2 heads, intermediate
4864, vocabulary 151936, tied embeddings) with random weights: nothing comes from a hub.

  engine            score_train.rollout.engine.Engine.generate_ids (decode under CUDA graphs when
                    the engine has that option; the row's note says which)
  hf_generate       HFRollout (HF `generate`, turn 1 then turn 2 on the concatenated ids, per-token
                    log-probs from the returned logits, as the trainer needs them) on the same
                    weights, HF_PROMPTS prompts (its batch of HF_PROMPTS * n sequences is already
                    large; all 64 would hold 4 x the logits it returns)
  hf_generate_batch transformers' continuous batching (`generate_batch`), where installed, all
                    prompts, token ids only
Decode roofline: every pure decode step must read all weights plus the K/V of every live context;
summed over the steps and divided by the copy bandwidth calibrated in this run, over the measured
time of those steps (the engine's own decode timer), = frac_peak of the engine row.
"""
from __future__ import annotations

import inspect
import time

import torch

from benchmarks import gpu_timing as gt
from benchmarks.shapes import shape

HF_PROMPTS = 16
SMOKE = {"prompts": 3, "n": 2, "prompt_len": 9, "max_new_tokens": 4}
SMOKE_MODEL = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2}
SUFFIX_LEN = 24  # the chat template's ids between y1 and y2 (the instruction turn)


def qwen25_05b_config(**overrides):
    from transformers import Qwen2Config
    kw = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
          "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
          "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "eos_token_id": None,
          "bos_token_id": None, "pad_token_id": 0}
    return Qwen2Config(**(kw | overrides))


def random_model(layers: int | None = None):
    """The benchmark model: Qwen2.5-0.5B's shape (SMOKE_MODEL in smoke mode), random weights, bf16 on a
    GPU (fp32 on the CPU)."""
    from score_train.model import CausalLM
    cfg = qwen25_05b_config(**(SMOKE_MODEL if gt.smoke() else {}))
    if layers:
        cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    with torch.device(gt.device()):
        m = CausalLM(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
    return m.to(torch.bfloat16 if gt.on_gpu() else torch.float32).eval()


def work_shape(key: str = "rollout") -> dict:
    return dict(SMOKE) if gt.smoke() else dict(shape("gpu", key))


def random_work(cfg, P: int, L: int, seed: int = 1):
    """P random prompts of L ids and one turn-2 suffix (no tokenizer: ids in, ids out)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(10, cfg.vocab_size, (L,), generator=g).tolist() for _ in range(P)]
    suffix = torch.randint(10, cfg.vocab_size, (SUFFIX_LEN if not gt.smoke() else 3,), generator=g).tolist()
    return prompts, suffix


def engine_options(engine_cls) -> tuple[dict, str]:
    """Keyword arguments that turn on CUDA-graph decode, if this engine has such an option."""
    params = inspect.signature(engine_cls.__init__).parameters
    if not gt.on_gpu():
        return {}, "eager (CPU)"
    for name, prm in params.items():  # a switch: cuda_graphs=True, use_cuda_graph=True, ... or enforce_eager=False
        if isinstance(prm.default, bool) and ("graph" in name.lower() or name == "enforce_eager"):
            value = name != "enforce_eager"
            return {name: value}, f"CUDA-graph decode ({name}={value})"
    return {}, "eager decode: this Engine has no CUDA-graph option"


def decode_roofline(model, stats: dict, copy_gbs: float) -> tuple[float, float]:
    """(bytes the decode steps had to read, seconds a copy-bandwidth-bound engine would need)."""
    cfg = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: counted once
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * model.head_dim * model.dtype.itemsize
    moved = stats["decode_steps"] * weight_bytes + stats["decode_ctx_tokens"] * kv_per_token
    return moved, moved / (copy_gbs * 1e9)


def _hf_generate_batch(hf, contexts: list[list[int]], max_new: int) -> list[list[int]]:
    from transformers import GenerationConfig
    gc = GenerationConfig(max_new_tokens=max_new, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                          eos_token_id=None, pad_token_id=0)
    res = hf.generate_batch(inputs=contexts, generation_config=gc, progress_bar=False)
    outs = list(res.values())
    if len(outs) != len(contexts):
        raise RuntimeError(f"generate_batch returned {len(outs)} of {len(contexts)} requests")
    return [list(o.generated_tokens) for o in outs]


def run_hf_generate_batch(model, prompts, suffix, n: int, M: int) -> tuple[int, float]:
    """Two turns through continuous batching: (generated tokens, seconds)."""
    hf = model.to_hf()
    if not hasattr(hf, "generate_batch"):
        raise RuntimeError("this transformers has no generate_batch")
    ctx = [list(p) for p in prompts for _ in range(n)]
    _hf_generate_batch(hf, ctx[:2], 2)  # warm-up (graph capture, kernels) outside the timing
    gt.sync()
    t0 = time.perf_counter()
    y1 = _hf_generate_batch(hf, ctx, M)
    y2 = _hf_generate_batch(hf, [c + a + suffix for c, a in zip(ctx, y1)], M)
    gt.sync()
    return sum(map(len, y1)) + sum(map(len, y2)), time.perf_counter() - t0


def run(quick: bool = False):
    from score_train.rollout.engine import Engine
    from score_train.rollout.types import SamplingParams

    sh = work_shape()
    if quick:
        sh.update(prompts=min(sh["prompts"], 16), max_new_tokens=min(sh["max_new_tokens"], 64))
    P, n, L, M = sh["prompts"], sh["n"], sh["prompt_len"], sh["max_new_tokens"]
    peak = gt.calibrate()
    model = random_model()
    prompts, suffix = random_work(model.config, P, L)
    params = SamplingParams(n=n, temperature=1.0, max_new_tokens=M, seed=0)
    desc = f"{P}x{n} L={L} {M}+{M}"
    kw, mode = engine_options(Engine)
    rows = []
    try:
        eng = Engine(model, None, eos_token_ids=set(), **kw)
        # warm-up on the full batch (a few tokens) so every Triton specialisation compiles untimed
        eng.generate_ids(prompts, SamplingParams(n=n, max_new_tokens=3), suffixes=[suffix] * P)
        eng.generate_ids(prompts[:1], SamplingParams(n=2, max_new_tokens=3), suffixes=[suffix])
        gt.sync()
        if gt.on_gpu():
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = eng.generate_ids(prompts, params, suffixes=[suffix] * P)
        gt.sync()
        secs = time.perf_counter() - t
        st = dict(eng.stats)
        gen = sum(len(s.turn1_ids) + len(s.turn2_ids) for s in out)
        moved, ideal = decode_roofline(model, st, peak["copy_gbs"])
        frac = ideal / st["decode_seconds"] if st["decode_seconds"] else None
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        # everything the rollouts hold beyond the weights at their peak: KV pool, activations, logits
        mem = (torch.cuda.max_memory_allocated() - weights) / 1e9 if gt.on_gpu() else None
        r = {"op": "rollout_two_turn", "shape": desc, "variant": "engine", "ms": secs * 1e3,
             "gbs": moved / st["decode_seconds"] / 1e9 if st["decode_seconds"] else None, "frac_peak": frac,
             "tokens_per_s": gen / secs, "generated": gen, "decode_steps": st["decode_steps"],
             "decode_s": st["decode_seconds"], "decode_ms_per_step": 1e3 * st["decode_seconds"] / max(st["decode_steps"], 1),
             "roofline_ms_per_step": 1e3 * ideal / max(st["decode_steps"], 1),
             "phases": {k: st[k] for k in getattr(Engine, "PHASES", ()) if k in st},
             "extra_mem_gb": mem, "decode_mode": mode}
        r["note"] = f"{r['tokens_per_s']:.0f} tok/s, {mode}"
        print(f"engine: {gen} tokens in {secs:.1f}s = {gen / secs:.0f} tok/s; decode {st['decode_steps']} steps "
              f"{st['decode_seconds']:.1f}s, roofline fraction {frac}", flush=True)
        del eng, out
    except Exception as e:  # noqa: BLE001
        r = gt.error_row("rollout_two_turn", desc, "engine", e)
    rows.append(r)
    yield r  # now, so a run killed during the baselines keeps it (the speed-ups are added below)
    gt.empty_cache()

    hp = min(HF_PROMPTS, P)
    hdesc = f"{hp}x{n} L={L} {M}+{M}"
    if gt.time_left() < 30:
        rows.append(gt.error_row("rollout_two_turn", hdesc, "hf_generate", "skipped: benchmark time budget spent"))
        yield rows[-1]
    else:
        try:
            from score_train.rollout.hf_baseline import HFRollout
            hf = HFRollout(model, None, batch_size=hp * n, eos_token_ids=set())
            hf.generate_ids(prompts[:1], SamplingParams(n=2, max_new_tokens=4), suffixes=[suffix])
            gt.sync()
            t = time.perf_counter()
            ref = hf.generate_ids(prompts[:hp], params, suffixes=[suffix] * hp)
            gt.sync()
            hsecs = time.perf_counter() - t
            hgen = sum(len(s.turn1_ids) + len(s.turn2_ids) for s in ref)
            print(f"hf generate ({hp} prompts): {hgen} tokens in {hsecs:.1f}s = {hgen / hsecs:.0f} tok/s", flush=True)
            rows.append({"op": "rollout_two_turn", "shape": hdesc, "variant": "hf_generate", "ms": hsecs * 1e3,
                         "tokens_per_s": hgen / hsecs, "generated": hgen,
                         "note": f"{hgen / hsecs:.0f} tok/s, batch {hp * n}"})
            yield rows[-1]
            del hf, ref
        except Exception as e:  # noqa: BLE001
            rows.append(gt.error_row("rollout_two_turn", hdesc, "hf_generate", e))
            yield rows[-1]
    gt.empty_cache()

    if not gt.on_gpu():  # its CPU warm-up alone takes minutes: not part of the smoke run
        rows.append(gt.error_row("rollout_two_turn", desc, "hf_generate_batch", "skipped: GPU only"))
        yield rows[-1]
    elif gt.time_left() < 30:
        rows.append(gt.error_row("rollout_two_turn", desc, "hf_generate_batch", "skipped: benchmark time budget spent"))
        yield rows[-1]
    else:
        try:
            bgen, bsecs = run_hf_generate_batch(model, prompts, suffix, n, M)
            rows.append({"op": "rollout_two_turn", "shape": desc, "variant": "hf_generate_batch", "ms": bsecs * 1e3,
                         "tokens_per_s": bgen / bsecs, "generated": bgen, "note": f"{bgen / bsecs:.0f} tok/s"})
        except Exception as e:  # noqa: BLE001
            rows.append(gt.error_row("rollout_two_turn", desc, "hf_generate_batch", e))
        yield rows[-1]
    eng_row = rows[0]
    for r in rows[1:]:
        if "tokens_per_s" in r and "tokens_per_s" in eng_row:
            eng_row[f"speedup_vs_{r['variant']}"] = eng_row["tokens_per_s"] / r["tokens_per_s"]
    if "speedup_vs_hf_generate" in eng_row:
        eng_row["note"] += f", {eng_row['speedup_vs_hf_generate']:.1f}x hf_generate"
    gt.empty_cache()
