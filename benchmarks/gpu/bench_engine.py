"""GPU benchmark: the paged two-turn engine vs HF generate on a random Qwen2.5-0.5B-shaped model (bf16).

Work (benchmarks/shapes.py "engine"): 64 prompts x n=8, 512-token prompts, 256 + 256 new tokens,
temperature 1.0, EOS disabled so every sample generates exactly its budget.

Reported: generated tokens/s, and the decode roofline fraction: for every pure decode step the
bytes it must read (all weights + the K/V of every live context) over the measured copy bandwidth,
summed, divided by the measured time of those steps. HF generate runs the same two-turn work on a
subset of the prompts (`HF_PROMPTS`) to keep the benchmark short; its tokens/s is comparable
because its batch (all its samples at once) is already large.
"""
from __future__ import annotations

import time

import torch

from benchmarks.gpu_timing import calibrate
from benchmarks.shapes import shape

HF_PROMPTS = 8


def qwen25_05b_config():
    from transformers import Qwen2Config
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=None,
                       bos_token_id=None, pad_token_id=0)


def random_model(layers: int | None = None):
    from score_train.model import CausalLM
    cfg = qwen25_05b_config()
    if layers:
        cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = CausalLM(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
    return m.to(torch.bfloat16).eval()


def run(quick: bool = False) -> list[dict]:
    from score_train.rollout.engine import Engine
    from score_train.rollout.hf_baseline import HFRollout
    from score_train.rollout.types import SamplingParams

    sh = dict(shape("gpu", "engine"))
    if quick:
        sh.update(prompts=16, max_new_tokens=64)
    P, n, L, M = sh["prompts"], sh["n"], sh["prompt_len"], sh["max_new_tokens"]
    peak = calibrate()
    model = random_model()
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, cfg.vocab_size, (L,), generator=g).tolist() for _ in range(P)]
    suffix = torch.randint(10, cfg.vocab_size, (24,), generator=g).tolist()
    params = SamplingParams(n=n, temperature=1.0, max_new_tokens=M, seed=0)
    eng = Engine(model, None, eos_token_ids=set())
    # warm-up on the full batch (a few tokens) so every Triton specialisation compiles outside the timing
    eng.generate_ids(prompts, SamplingParams(n=n, max_new_tokens=3), suffixes=[suffix] * P)
    eng.generate_ids(prompts[:1], SamplingParams(n=2, max_new_tokens=3), suffixes=[suffix])
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = eng.generate_ids(prompts, params, suffixes=[suffix] * P)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t
    st = eng.stats
    gen = sum(len(s.turn1_ids) + len(s.turn2_ids) for s in out)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * model.head_dim * 2
    ideal = (st["decode_steps"] * weight_bytes + st["decode_ctx_tokens"] * kv_per_token) / (peak["copy_gbs"] * 1e9)
    frac = ideal / st["decode_seconds"] if st["decode_seconds"] else 0.0
    desc = f"{P}x{n} L={L} {M}+{M}"
    rows = [{"op": "engine_two_turn", "shape": desc, "variant": "paged", "ms": secs * 1e3,
             "gbs": (st["decode_steps"] * weight_bytes + st["decode_ctx_tokens"] * kv_per_token)
             / st["decode_seconds"] / 1e9, "frac_peak": frac, "tokens_per_s": gen / secs,
             "decode_steps": st["decode_steps"], "decode_s": st["decode_seconds"],
             "phases": {k: st[k] for k in Engine.PHASES}, "extra_mem_gb": eng.num_blocks * eng._bytes_per_block() / 1e9}]
    print(f"engine: {gen} tokens in {secs:.1f}s = {gen / secs:.0f} tok/s; decode {st['decode_steps']} steps "
          f"{st['decode_seconds']:.1f}s, roofline fraction {frac:.2f}", flush=True)
    del eng
    torch.cuda.empty_cache()
    hp = min(HF_PROMPTS, P)
    hf = HFRollout(model, None, batch_size=hp * n, eos_token_ids=set())
    hf.generate_ids(prompts[:1], SamplingParams(n=2, max_new_tokens=4), suffixes=[suffix])
    torch.cuda.synchronize()
    t = time.perf_counter()
    ref = hf.generate_ids(prompts[:hp], params, suffixes=[suffix] * hp)
    torch.cuda.synchronize()
    hsecs = time.perf_counter() - t
    hgen = sum(len(s.turn1_ids) + len(s.turn2_ids) for s in ref)
    print(f"hf generate ({hp} prompts): {hgen} tokens in {hsecs:.1f}s = {hgen / hsecs:.0f} tok/s", flush=True)
    rows.append({"op": "engine_two_turn", "shape": f"{hp}x{n} L={L} {M}+{M}", "variant": "hf_generate",
                 "ms": hsecs * 1e3, "tokens_per_s": hgen / hsecs})
    rows[0]["speedup_vs_hf"] = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    return rows
