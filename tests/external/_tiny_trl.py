"""A tiny random Llama, a word-level tokenizer, an in-memory prompt dataset and a reward function: what TRL's
GRPOTrainer needs to train on a CPU with nothing fetched from a hub."""
import gc

import torch


def word_tokenizer(vocab_size: int):
    """Token i is the word "w{i}" (0, 1, 2: pad, eos, unk), split on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.padding_side = "left"
    return tok


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def chat_word_tokenizer(vocab_size: int):
    """word_tokenizer with a chat template: ids 3 and 4 are the "<|user|>" and "<|assistant|>" headers (words
    start at w5), each message ends with <eos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "<|user|>": 3, "<|assistant|>": 4,
             **{f"w{i}": i for i in range(5, vocab_size)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.padding_side = "left"
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tiny_llama(directory, vocab_size: int, seed: int = 0) -> str:
    """Saved, so GRPOTrainer can load its reference model from model.config._name_or_path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                      eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    return str(directory)


def prompts(n: int = 16, words: int = 6):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [" ".join(f"w{3 + (i * 7 + j) % 50}" for j in range(words))
                                         for i in range(n)]})


def chat_prompts(n: int = 16, words: int = 6):
    """prompts() as one-message conversations."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [[{"role": "user", "content": " ".join(f"w{5 + (i * 7 + j) % 50}"
                                                                                for j in range(words))}]
                                         for i in range(n)]})


def reward_even_words(completions, **kwargs):
    """Fraction of words with an even id: a reward that differs across the samples of a group. A completion is a
    text or (conversational prompts) a list of messages, the last one's content scored."""
    out = []
    for c in completions:
        c = c[-1]["content"] if isinstance(c, list) else c
        ids = [int(w[1:]) for w in c.split() if w.startswith("w") and w[1:].isdigit()]
        out.append(sum(i % 2 == 0 for i in ids) / max(1, len(ids)))
    return out


def peak_bytes(fn):
    """Runs fn() under torch.profiler with memory profiling and returns (fn's result, the peak of the
    running sum of CPU tensor allocations minus frees during it, in bytes)."""
    import gc

    from torch.profiler import ProfilerActivity, profile

    gc.collect()  # garbage of earlier tests freed inside the window would count as negative allocations
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    # kineto's "[memory]" records: one per allocation (+bytes) and free (-bytes), any thread
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    assert events, "the profiler recorded no allocation"
    return result, peak


def one_thread_and_collect():
    """A fixture body: one intra-op thread (on a small shared CPU, two threads contending over the tiny GEMMs of
    token-by-token generation run several times slower than one), then free the trainers' reference cycles (their
    patched forwards) so their models do not outlive the test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    gc.collect()
