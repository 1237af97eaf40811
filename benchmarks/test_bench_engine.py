"""Two-turn rollouts: the paged prefix-sharing Engine vs HF `generate` (turn 1 for every sample, then
turn 2 on the concatenated ids), on the same randomly initialised model, the same prompts and the
same sampling settings. CPU shapes use a tiny model so the pair runs in seconds; there the ratio
mostly guards per-step overhead. The GPU shape is a Qwen2.5-0.5B-shaped model in bf16."""
import pytest
import torch

from benchmarks.conftest import VARIANTS
from benchmarks.memory_probe import device_for
from benchmarks.shapes import shape

MODELS = {
    "tiny": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "qwen2.5-0.5b": {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True},
}
EOS = 2


def word_tokenizer(vocab_size: int):
    """An in-memory word-level tokenizer (loading a real one takes up to a minute here)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": EOS, "<pad>": 3}
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def random_model(name: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from score_train.model import from_hf

    cfg_cls = Qwen2Config if name.startswith("qwen") else LlamaConfig
    cfg = cfg_cls(**MODELS[name], eos_token_id=EOS, bos_token_id=1, pad_token_id=3)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    return from_hf(hf, dtype=dtype, device=device)


def case_engine(machine: str) -> dict:
    from score_train.rollout.engine import Engine
    from score_train.rollout.hf_baseline import HFRollout
    from score_train.rollout.types import SamplingParams

    s, dev = shape(machine, "engine"), device_for(machine)
    name = s.get("model", "tiny" if machine == "cpu" else "qwen2.5-0.5b")
    dt = torch.bfloat16 if machine == "gpu" else torch.float32
    model = random_model(name, dev, dt)
    tok = word_tokenizer(MODELS[name]["vocab_size"])
    g = torch.Generator().manual_seed(1)
    plen = s.get("prompt_len", 48)
    lens = torch.randint(plen // 2, plen + 1, (s["prompts"],), generator=g).tolist()
    prompts = [torch.randint(4, MODELS[name]["vocab_size"], (n,), generator=g).tolist() for n in lens]
    suffix = torch.randint(4, MODELS[name]["vocab_size"], (12,), generator=g).tolist()
    params = SamplingParams(n=s["n"], temperature=1.0, max_new_tokens=s["max_new_tokens"], seed=0)
    engine = Engine(model, tok, eos_token_ids={EOS})
    hf = HFRollout(model, tok, batch_size=len(prompts) * s["n"], eos_token_ids={EOS})
    suffixes = [suffix] * len(prompts)
    return {"shape": f"{name} {len(prompts)} prompts x n={s['n']}, ~{plen} prompt, {s['max_new_tokens']}+"
                     f"{s['max_new_tokens']} new {str(dt)[6:]}",
            "ours": lambda: engine.generate_ids(prompts, params, suffixes=suffixes),
            "baseline": lambda: hf.generate_ids(prompts, params, suffixes=suffixes),
            "rounds": 3}


CASES = {"engine": case_engine}


@pytest.mark.parametrize("variant", VARIANTS)
def test_engine(paired, variant):
    paired("engine", variant)
