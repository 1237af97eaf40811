"""The one registry of benchmark shapes: `cpu` shapes run in seconds on 2 cores; `gpu` shapes are
the GPU benchmark shapes. Benchmarks look shapes up here instead of hard-coding them."""

SHAPES = {
    "cpu": {
        "token_kl": {"n": 1 << 20},
        "linear_logprobs": {"N": 4096, "d": 576, "V": 49152},
        "linear_logprobs_small": {"N": 512, "d": 576, "V": 49152},
        "logprobs_from_logits": {"N": 1024, "V": 49152},
        "linear_kl": {"N": 512, "d": 576, "V": 49152},
        "turn_advantages": {"B": 4096, "K": 2, "group": 8},
        "policy_loss": {"B": 64, "T": 1024, "K": 2},
        "paged_attention_decode": {"B": 16, "ctx": 256, "Hq": 9, "Hkv": 3, "D": 64},
        "store_kv": {"N": 4096, "Hkv": 3, "D": 64},
        "engine": {"prompts": 8, "n": 4, "prompt_len": 48, "max_new_tokens": 32},
        "train_step": {"B": 8, "T": 256},
    },
    "gpu": {
        "token_kl": {"n": 1 << 24},
        "paged_attention_decode": {"B": 512, "ctx": 768, "Hq": 14, "Hkv": 2, "D": 64},  # = paged_attention decode
        "store_kv": {"N": 32768, "Hkv": 2, "D": 64},
        # bench_paged_attention: Qwen2.5-0.5B attention shape; decode, small-batch decode (split-K), prefill
        "paged_attention": {"Hq": 14, "Hkv": 2, "D": 64, "block_size": 16, "decode": {"B": 512, "ctx": 768},
                            "decode_small": {"B": 4, "ctx": 4096}, "prefill": {"B": 16, "q_len": 512}},
        "linear_logprobs": [{"N": 16384, "d": 4096, "V": 151936}, {"N": 8192, "d": 2048, "V": 128256}],
        "logprobs_from_logits": {"N": 8192, "V": 128256},
        "linear_kl": {"N": 8192, "d": 2048, "V": 128256},
        "policy_loss": {"B": 1024, "T": 1024, "K": 2},
        "turn_advantages": {"B": 1024, "K": 2, "group": 8},
        "engine": {"prompts": 64, "n": 8, "prompt_len": 512, "max_new_tokens": 256},
        # scripts/device_check.sh: Qwen2.5-0.5B's lm_head; two-turn rollouts and one SCoRe step
        "linear_logprobs_qwen05b": {"N": 4096, "d": 896, "V": 151936},
        "rollout": {"prompts": 64, "n": 4, "prompt_len": 512, "max_new_tokens": 256},
        "score_step": {"prompts": 64, "n": 4, "prompt_len": 512, "max_new_tokens": 256},
    },
}


def shape(machine: str, op: str):
    return SHAPES[machine][op]
