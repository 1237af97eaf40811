"""Expected step time and memory for SCoRe training of 1.5B / 7B models on 8 and 64 GPUs (docs/scaling.md).

Formulas only, fed with the measured numbers named below; run `python scripts/scaling_estimates.py` to regenerate
the table. Assumptions are arguments so that a reader can plug in their own.
"""
from __future__ import annotations

import argparse

# Qwen2.5 shapes (config.json of the public checkpoints)
MODELS = {
    "1.5B": dict(P=1.54e9, layers=28, hidden=1536, kv_heads=2, head_dim=128, vocab=151936),
    "7B": dict(P=7.62e9, layers=28, hidden=3584, kv_heads=4, head_dim=128, vocab=152064),
}


def estimate(m: dict, gpus: int, *, problems=512, n=4, prompt=200, gen=512, instr=60, mfu=0.40,
             peak_tflops=790.0, hbm_tbs=3.0, decode_eff=0.35, decode_batch=256, intra_gbs=450.0,
             inter_gbs=50.0, micro_tokens=16384, gpus_per_node=8) -> dict:
    P = m["P"]
    episodes = problems * n
    gen_tokens = episodes * 2 * gen                      # two turns
    train_tokens = episodes * (prompt + gen + instr + gen)
    per_rank_train = train_tokens / gpus
    # --- memory per rank (bytes): fp32 sharded params + fp32 grads + Adam m,v; bf16 sharded reference
    params = 4 * P / gpus
    grads = 4 * P / gpus
    adam = 8 * P / gpus
    ref = 2 * P / gpus
    # activation checkpointing keeps one bf16 [tokens, hidden] per layer + one layer's full activations
    act = micro_tokens * m["hidden"] * 2 * m["layers"] + micro_tokens * m["hidden"] * 2 * 16
    gathered = 2 * P                                     # full bf16 weights during rollout
    kv_per_token = 2 * m["layers"] * m["kv_heads"] * m["head_dim"] * 2
    kv_budget = decode_batch * (prompt + gen + instr + gen) * kv_per_token
    # --- time
    update_s = 6 * P * per_rank_train / (mfu * peak_tflops * 1e12)
    ref_s = 2 * P * per_rank_train / (mfu * peak_tflops * 1e12)
    avg_ctx = prompt + gen + instr / 2 + gen / 2
    step_bytes = 2 * P + decode_batch * avg_ctx * kv_per_token
    decode_step_s = step_bytes / (hbm_tbs * 1e12)
    roof_tok_s = decode_batch / decode_step_s
    tok_s = roof_tok_s * decode_eff
    rollout_s = gen_tokens / gpus / tok_s
    # FSDP traffic per optimisation pass: all-gather fwd + bwd (bf16) + reduce-scatter (fp32) per micro-batch
    micro = max(1, round(per_rank_train / micro_tokens))
    comm_bytes = micro * (2 * P + 2 * P + 4 * P) * (gpus - 1) / gpus + 2 * P * (gpus - 1) / gpus  # + rollout gather
    bw = intra_gbs if gpus <= gpus_per_node else inter_gbs
    comm_s = comm_bytes / (bw * 1e9)
    # rollouts bound the step when decode throughput per GPU falls below this
    breakeven_tok_s = (gen_tokens / gpus) / (update_s + ref_s)
    return dict(mem_gb=dict(params=params / 1e9, grads=grads / 1e9, adam=adam / 1e9, ref=ref / 1e9, act=act / 1e9,
                            gathered=gathered / 1e9, kv=kv_budget / 1e9,
                            total=(params + grads + adam + ref + act + gathered + kv_budget) / 1e9),
                update_s=update_s, ref_s=ref_s, rollout_s=rollout_s, comm_s=comm_s, micro=micro,
                comm_gb=comm_bytes / 1e9, roof_tok_s=roof_tok_s, tok_s=tok_s, breakeven_tok_s=breakeven_tok_s,
                gen_tokens=gen_tokens, train_tokens=train_tokens)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--decode-eff", type=float, default=0.35, help="fraction of the decode roofline reached")
    p.add_argument("--mfu", type=float, default=0.40)
    a = p.parse_args(argv)
    print("| model | GPUs | params+grads+Adam GB | ref GB | act GB | gathered GB | KV GB | total GB | rollout s | "
          "update s | ref s | comm GB (s) | step s | rollout-bound below tok/s/GPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, m in MODELS.items():
        for g in (8, 64):
            e = estimate(m, g, decode_eff=a.decode_eff, mfu=a.mfu)
            mm = e["mem_gb"]
            step = e["rollout_s"] + e["update_s"] + e["ref_s"] + e["comm_s"]
            print(f"| {name} | {g} | {mm['params'] + mm['grads'] + mm['adam']:.1f} | {mm['ref']:.2f} | {mm['act']:.1f} | "
                  f"{mm['gathered']:.1f} | {mm['kv']:.1f} | {mm['total']:.1f} | {e['rollout_s']:.1f} | "
                  f"{e['update_s']:.1f} | {e['ref_s']:.1f} | {e['comm_gb']:.0f} ({e['comm_s']:.1f}) | {step:.1f} | "
                  f"{e['breakeven_tok_s']:.0f} (engine est. {e['tok_s']:.0f}) |")


if __name__ == "__main__":
    main()
