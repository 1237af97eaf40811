"""One training step (forward, loss, backward, clip, AdamW) on the same packed samples: the trainer's
`score_train.train.train_step` (lean model, fused log-probs, fused policy_loss with the per-turn k3
KL against a frozen reference) vs a Hugging Face forward on the padded batch with the naive loss
(`log_softmax(logits).gather`, the same REINFORCE + k3 KL terms in chained torch ops).
SCoRe Stage II settings. CPU: a small random model with a realistic vocabulary, so the logits matter."""
import copy

import pytest
import torch

from benchmarks.conftest import VARIANTS
from benchmarks.memory_probe import device_for
from benchmarks.shapes import shape

MODELS = {
    "small": {"vocab_size": 8192, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "qwen2.5-0.5b": {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True},
}


def _samples(B, T, V, g):
    """B two-turn samples of exactly T tokens: prompt, y1, instruction, y2."""
    from score_train.rollout.types import Episode

    out = []
    for b in range(B):
        p, i = T // 4, T // 16
        t1 = int(torch.randint(T // 8, T // 3, (1,), generator=g))
        ids = torch.randint(4, V, (T,), generator=g).tolist()
        lps = (-torch.rand(T, generator=g) * 3).tolist()
        out.append(Episode(prompt_index=b // 4, sample_index=b % 4, prompt_ids=ids[:p],
                                 turn1_ids=ids[p:p + t1], turn1_logprobs=lps[p:p + t1], turn1_text="",
                                 finish_reasons=["length", "length"], instruction_ids=ids[p + t1:p + t1 + i],
                                 turn2_ids=ids[p + t1 + i:], turn2_logprobs=lps[p + t1 + i:], turn2_text=""))
    return out


def case_train_step(machine: str) -> dict:
    try:
        from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

        from score_train import algos, packing
        from score_train.config import Config
        from score_train.model import from_hf
        from score_train.train import StepInputs, UpdateSettings, train_step
    except ImportError as e:
        pytest.skip(f"the trainer has not landed yet ({e})")
    s, dev = shape(machine, "train_step"), device_for(machine)
    name = s.get("model", "small" if machine == "cpu" else "qwen2.5-0.5b")
    dt = torch.bfloat16 if machine == "gpu" else torch.float32
    B, T, V = s["B"], s["T"], MODELS[name]["vocab_size"]
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config((Qwen2Config if name.startswith("qwen") else LlamaConfig)(**MODELS[name]))
    hf_ref = copy.deepcopy(hf).eval().requires_grad_(False)
    policy = from_hf(copy.deepcopy(hf), dtype=dt, device=dev)
    ref = from_hf(copy.deepcopy(hf), dtype=dt, device=dev).requires_grad_(False)
    hf, hf_ref = hf.to(dev, dt), hf_ref.to(dev, dt)

    cfg = Config()
    cfg.optim.micro_batch_tokens = B * T
    settings = algos.stage_settings(cfg.algo, "stage2")
    g = torch.Generator().manual_seed(0)
    samples = _samples(B, T, V, g)
    values = torch.randn(B, 2, generator=g)
    inp = StepInputs(samples=samples, values=values, settings=settings)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)

    # The baseline's padded batch (all rows are T long here, so no padding work is wasted on it).
    batch = packing.pack_samples(samples)
    ids = batch.input_ids.view(B, T).to(dev)
    tgt = batch.targets.view(B, T).to(dev)
    tids = batch.turn_ids.view(B, T).to(dev)
    adv = packing.token_values(values, batch).view(B, T).to(dev)
    coef = algos.kl_coef_tokens(settings, batch).view(B, T).to(dev)
    mask = tids >= 0
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-6)

    def naive():
        hf_opt.zero_grad(set_to_none=True)
        safe = tgt.clamp(min=0)[..., None]
        lp = torch.log_softmax(hf(ids).logits.float(), -1).gather(-1, safe).squeeze(-1)
        with torch.no_grad():
            rlp = torch.log_softmax(hf_ref(ids).logits.float(), -1).gather(-1, safe).squeeze(-1)
        d = lp - rlp
        per_tok = -adv * torch.exp(lp - lp.detach()) + coef * (torch.exp(-d) + d - 1)
        loss = (per_tok * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), cfg.optim.grad_clip)
        hf_opt.step()
        return float(loss)

    return {"shape": f"{name} B={B} T={T} V={V} {str(dt)[6:]}",
            "ours": lambda: train_step(policy, ref, opt, inp, UpdateSettings.of(cfg), 0), "baseline": naive,
            "rounds": 3}


DEMO = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True}  # SmolLM2-135M's shape


def demo_samples(B: int, g, V: int = 49152, layout=(36, 32, 56, 32)):
    """B two-turn samples with the demo's token layout (chat prompt, y1, instruction, y2 at 32 new tokens)."""
    from score_train.rollout.types import Episode

    p, t1, i, t2 = layout
    out = []
    for b in range(B):
        ids = torch.randint(4, V, (p + t1 + i + t2,), generator=g).tolist()
        lps = (-torch.rand(len(ids), generator=g)).tolist()
        out.append(Episode(prompt_index=b // 4, sample_index=b % 4, prompt_ids=ids[:p],
                                 turn1_ids=ids[p:p + t1], turn1_logprobs=lps[p:p + t1], turn1_text="",
                                 finish_reasons=["length", "length"], instruction_ids=ids[p + t1:p + t1 + i],
                                 turn2_ids=ids[p + t1 + i:], turn2_logprobs=lps[p + t1 + i:], turn2_text=""))
    return out


def with_sampled_prefix(model, samples, cut: int):
    """The samples as the paged engine hands them to the trainer (generate(..., capture_layer=cut)): each with
    the residual after the frozen bottom `cut` layers, which the sampler computed anyway. Here it is computed
    once, outside the timed step, by the forward the engine's capture equals (tests/test_trainer.py)."""
    import dataclasses

    out = []
    with torch.no_grad():
        for s in samples:
            h = model(torch.tensor(s.full_ids()[:-1]), to_layer=cut)  # the last token is never run by the sampler
            out.append(dataclasses.replace(s, prefix_hidden=h, prefix_layer=cut))
    return out


def case_train_step_demo(machine: str, B: int = 8, autocast: bool = False) -> dict:
    """The demo's optimisation step (issue 14): SmolLM2-135M's shape (random weights), the top 8 of 30 layers
    trained, SCoRe Stage II with the k3 KL, T=0.7, on the same samples: today's `train_step` (given the samples
    as the engine returns them, with the frozen prefix it already ran: rollout.reuse_prefix) vs the frozen copy
    of the step at commit 693d5f9 (benchmarks/baseline_train_step.py), which reruns the frozen 22 layers.
    autocast=True adds "ours_autocast": today's step under model.autocast_bf16 (fast only where the CPU has bf16
    matmul units: AMX or AVX512-BF16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks import baseline_train_step as old
    from score_train import algos, packing
    from score_train.config import Config
    from score_train.model import from_hf
    from score_train.train import StepInputs, UpdateSettings, set_trainable, train_step

    if machine != "cpu":
        pytest.skip("the demo's step is a CPU measurement")
    torch.manual_seed(0)
    base = from_hf(LlamaForCausalLM(LlamaConfig(**DEMO)))

    def models():
        m = copy.deepcopy(base)
        cut = set_trainable(m, 8, False)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-6)
        return m, copy.deepcopy(m).requires_grad_(False).eval(), opt, cut

    cfg = Config()
    cfg.rollout.temperature = 0.7
    st = algos.stage_settings(cfg.algo, "stage2")
    g = torch.Generator().manual_seed(0)
    samples, values = demo_samples(B, g), torch.randn(B, 2, generator=g)
    (m1, r1, o1, cut), (m2, r2, o2, _) = models(), models()
    sampled = with_sampled_prefix(m1, samples, cut)
    out = {"shape": f"SmolLM2-135M shape, top 8/30 layers, B={B} x {len(samples[0].full_ids())} tokens, fp32",
           "ours": lambda: train_step(m1, r1, o1, StepInputs(sampled, values, st), UpdateSettings.of(cfg), cut),
           "baseline": lambda: old.train_step(m2, r2, o2, samples, values, st, cfg, cut), "rounds": 3}
    if autocast:  # the same step with model.autocast_bf16 (fp32 weights, bf16 matmuls in the layers)
        m3, r3, o3, _ = models()
        cfg_bf = copy.deepcopy(cfg)
        cfg_bf.model.autocast_bf16 = True
        out["ours_autocast"] = lambda: train_step(m3, r3, o3, StepInputs(sampled, values, st),
                                                  UpdateSettings.of(cfg_bf), cut)
    return out


CASES = {"train_step": case_train_step, "train_step_demo": case_train_step_demo}


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step(paired, variant):
    paired("train_step", variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step_demo(paired, variant):
    paired("train_step_demo", variant)
