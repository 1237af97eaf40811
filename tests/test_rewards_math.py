"""Math answer extraction and equivalence (math-verify and the fallback), the arithmetic reading, the
reward API and the reward worker pool."""
import pytest

from score_train.data import Record
from score_train.rewards import RewardPool, answer_key, reward
from score_train.rewards.math import (
    HAVE_MATH_VERIFY,
    arithmetic_answer,
    extract_answer,
    is_equivalent,
    last_boxed,
    last_number,
    normalize,
)

BACKENDS = ["fallback"] + (["math_verify"] if HAVE_MATH_VERIFY else [])

EQUIVALENT = [
    # fractions
    ("1/2", "\\frac{1}{2}"), ("\\dfrac{3}{4}", "0.75"), ("\\frac12", "0.5"), ("-\\frac{2}{4}", "-1/2"),
    # radicals
    ("\\sqrt{8}", "2\\sqrt{2}"), ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"), ("3\\sqrt{3}", "\\sqrt{27}"),
    # equations and expressions
    ("x=2", "2"), ("y = 2x+1", "2x+1"), ("x^2-1", "(x-1)(x+1)"), ("\\pi/2", "\\frac{\\pi}{2}"),
    # tuples and intervals
    ("(1,2)", "(1, 2)"), ("(3, -1)", "(3,-1)"), ("[0,1)", "[0, 1)"), ("(-\\infty, 2]", "(-\\infty,2]"),
    # percentages
    ("50\\%", "50"), ("25%", "25\\%"),
    # units, degrees, money
    ("5 \\text{ cm}", "5"), ("12 meters", "12"), ("30^\\circ", "30"), ("\\$5", "5"),
    # text answers
    ("\\text{No}", "No"), ("yes", "Yes"), ("\\text{Alice}", "alice"),
    # numbers
    ("1,176,470", "1176470"), ("007", "7"), ("2.50", "2.5"),
]

NOT_EQUIVALENT = [
    ("1/3", "\\frac{1}{2}"), ("\\sqrt{2}", "2"), ("x=3", "2"), ("(2,1)", "(1,2)"), ("[0,1)", "[0,1]"),
    ("(1,2,3)", "(1,2)"), ("51\\%", "50"), ("6 \\text{ cm}", "5"), ("no", "yes"), ("on", "no"),
    ("Bob", "Alice"), ("-1", "1"), ("3", "4"), ("2x+1", "2x-1"),
    # empty or garbage predictions
    ("", "3"), (None, "3"), ("   ", "3"), ("garbage", "3"), ("\\frac{", "1"), ("}}}{{{", "1"),
    ("__import__('os').system('true')", "0"), ("x" * 5000, "1"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pred, gold", EQUIVALENT)
def test_equivalent(backend, pred, gold):
    assert is_equivalent(pred, gold, backend=backend)
    assert is_equivalent(gold, pred, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pred, gold", NOT_EQUIVALENT)
def test_not_equivalent(backend, pred, gold):
    assert not is_equivalent(pred, gold, backend=backend)


def test_backend_argument():
    with pytest.raises(ValueError, match="backend"):
        is_equivalent("1", "1", backend="nope")


@pytest.mark.parametrize("text, ans", [
    ("so \\boxed{\\frac{1}{\\sqrt{2}}} done", "\\frac{1}{\\sqrt{2}}"),
    ("first \\boxed{1} then \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("a \\boxed{x^{2}+{1}} b", "x^{2}+{1}"),
    ("\\fbox{7}", "7"),
    ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", "\\frac{3}{4}"),
    ("Final Answer: The final answer is 12.\nSomething else", "12"),
    ("Final Answer: The final answer is $(1, 2)$.", "(1, 2)"),
    ("Final Answer: The final answer is \\boxed{5}. I hope it is correct.", "5"),
    ("\\boxed{3} ... Final Answer: The final answer is $4$. I hope it is correct.", "4"),
    ("Final Answer: The final answer is $4$. I hope it is correct. Actually \\boxed{5}", "5"),
    ("the answer is \\boxed{unclosed", None),
    ("no answer at all: 42", None),
    ("", None), (None, None),
])
def test_extract_answer(text, ans):
    assert extract_answer(text) == ans


def test_last_boxed_and_normalize():
    assert last_boxed("\\boxed{a}\\boxed{b}") == "b"
    assert normalize("$\\left( 1, 2 \\right)$.") == "( 1, 2 )"
    assert normalize("\\text{ Yes }") == "yes"


@pytest.mark.parametrize("text, ans", [
    ("37 + 45 = 82", "82"),
    ("The answer is 82.", "82"),
    ("Sure! 37 plus 45 equals 82. Let me know if you need more help.", "82"),
    ("It is \\boxed{82}, not 83", "82"),
    ("Final Answer: The final answer is 82. I hope it is correct. (check: 80 + 2)", "82"),
    ("The sum is 1,234", "1234"),
    ("Result: -17", "-17"),
    ("82-5", "5"),  # a minus right after a number is subtraction
    ("x=-5", "-5"),
    ("82 - 5", "5"),
    ("3.5 apples", "3.5"),
    ("no digits", None), ("", None), (None, None),
])
def test_arithmetic_answer(text, ans):
    assert arithmetic_answer(text) == ans


def test_last_number():
    assert last_number("x1 and 2.") == "2" and last_number("a(-3)") == "-3"


def _rec(kind, answer="82"):
    return Record(id="r", kind=kind, problem="What is 37 + 45?", answer=answer)


def test_reward_api():
    r = _rec("arithmetic")
    assert reward("arithmetic", "37 + 45 = 82", r) == 1.0
    assert reward("arithmetic", "82.0", r) == 1.0
    assert reward("arithmetic", "It's 81", r) == 0.0
    assert reward("arithmetic", "", r) == 0.0
    assert reward("arithmetic", "\\boxed{82}", {"answer": "82"}) == 1.0
    m = _rec("math", "\\frac{1}{2}")
    assert reward("math", "Final Answer: The final answer is $0.5$. I hope it is correct.", m) == 1.0
    # math is strict: an answer must be given in the asked-for form
    assert reward("math", "the answer is 1/2", m) == 0.0
    code = Record(id="c", kind="code", problem="def f(x):\n", tests="assert f(1) == 2\n", entry_point="f")
    assert reward("code", "```python\ndef f(x):\n    return x + 1\n```", code) == 1.0
    assert reward("code", "    return x + 1\n", code) == 1.0  # a completion of the prompt
    assert reward("code", "```python\ndef f(x):\n    return x\n```", code) == 0.0
    with pytest.raises(ValueError, match="task_kind"):
        reward("poetry", "x", r)


def test_answer_key():
    assert answer_key("arithmetic", "so 82.0") == "82"
    assert answer_key("math", "\\boxed{\\text{ Yes }}") == "yes"
    assert answer_key("math", "nothing") is None and answer_key("code", "x") is None


@pytest.mark.parametrize("workers", [0, 2])
def test_reward_pool(workers):
    r = _rec("arithmetic")
    items = [("arithmetic", f"the answer is {80 + i % 4}", r) for i in range(40)]
    expect = [1.0 if (80 + i % 4) == 82 else 0.0 for i in range(40)]
    with RewardPool(workers=workers, chunk=8) as pool:
        assert pool.score(items) == expect
        fut = pool.submit(items[:5])
        assert fut.result(timeout=60) == expect[:5]
        assert pool.score([]) == []


def test_champ_gold_answers_score_themselves():
    from score_train.data import load_champ

    for r in load_champ():
        assert reward("math", f"Final Answer: The final answer is ${r.answer}$. I hope it is correct.", r) == 1.0
        assert reward("math", f"\\boxed{{{r.answer}}}", r) == 1.0


def test_reward_pool_code_items():
    code = Record(id="c", kind="code", problem="def f(x):\n", tests="assert f(1) == 2\n", entry_point="f")
    items = [("code", "    return x + 1\n", code), ("code", "    while True: pass\n", code),
             ("code", "    return x\n", code)]
    with RewardPool(workers=1, code_timeout_s=1.0) as pool:
        assert pool.score(items) == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("kind, text, stated", [
    ("arithmetic", "55 + 33 = 88.", "88"),
    ("arithmetic", "The answer is \\boxed{88}, not 90", "88"),  # the boxed answer wins over the last number
    ("arithmetic", "Final Answer: The final answer is $1,234$. I hope it is correct.", "1234"),
    ("arithmetic", "To add these we need to combine the numbers by", None),  # cut off before any number
    ("arithmetic", "", None),
    ("arithmetic", None, None),
    ("math", "so x = 3, thus \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("math", "Final Answer: The final answer is $7$. I hope it is correct.", "7"),
    ("math", "We have x = 3 and then", None),  # a number but no stated final answer
    ("math", "\\boxed{ }", None),
    ("code", "```python\ndef f(x):\n    return x\n```", "def f(x):\n    return x\n"),
    ("code", "def f(x): return x", "def f(x): return x"),
    ("code", "   \n", None),
    ("code", None, None),
])
def test_stated_answer(kind, text, stated):
    from score_train.rewards import stated_answer

    assert stated_answer(kind, text) == stated


def test_stated_answer_agrees_with_reward():
    # a response the reward scores right always states an answer
    from score_train.rewards import stated_answer

    rec = Record(id="a", kind="arithmetic", problem="What is 2 + 2?", answer="4")
    for text in ("4", "2 + 2 = 4.", "\\boxed{4}", "it is 4, final"):
        assert reward("arithmetic", text, rec) == 1.0 and stated_answer("arithmetic", text) == "4"
    with pytest.raises(ValueError, match="task_kind"):
        stated_answer("chess", "e4")
