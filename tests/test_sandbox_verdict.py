"""The runner trusts nothing the program names (issue 32, classes 1 and 2): no verdict forged through
the name manifest, the builtins, an exception's type or a module import; and any honest int crosses."""
import pytest

from score_train.rewards.code import check_program
from tests.test_sandbox_attacks import LEVELS, WRONG

# The program wraps the harness's own _wire.send (all of the candidate's process is the program's) and
# adds entries to the manifest of names it hands the tests.
_INJECT = ("import sys, _wire\n_h = sys.modules['__main__']\n_send = _wire.send\n"
           "def _forge(f, msg):\n    if 'ready' in msg:\n        msg['ready'].extend(ENTRIES)\n"
           "    return _send(f, msg)\n_wire.send = _forge\n")


def _inject(entries: str) -> str:
    return WRONG + _INJECT + entries


FORGED = {
    # its own builtins for the tests: abs, sorted, isinstance that answer what passes
    "builtins_dict": (_inject("import builtins\nENTRIES = [['__builtins__', 'v', _wire.encode(dict(vars(builtins), "
                              "abs=lambda x: 0, sorted=lambda x: [2], isinstance=lambda *a: True), _h._handle)]]\n"),
                      "assert abs(f(1) - 2) < 1e-9 and sorted([f(1)]) == [2] and isinstance(f(1), str)\n"),
    # a dunder the interpreter reads, and a private name that shadows nothing but must not cross either
    "dunder_names": (_inject("import builtins\nENTRIES = [['__name__', 'v', 'x'], ['_private', 'v', 1], "
                             "['__builtins__', 'v', _wire.encode(dict(vars(builtins), abs=lambda x: 0), _h._handle)]]\n"),
                     "assert abs(f(1) - 2) < 1e-9 and _private == 1\n"),
    # StopIteration raised in a call ends the tests' map early, so all() sees nothing false
    "stopiteration_ends_map": ("def f(x):\n    raise StopIteration\n",
                               "assert all(map(lambda v: f(v) == 2 * v, [1, 2, 3]))\n"),
    "stopiteration_ends_for_loop": ("def f(x):\n    raise StopIteration\n",
                                    "for ok in map(lambda v: f(v) == 2 * v, [1, 2, 3]):\n    assert ok\n"),
}


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", sorted(FORGED))
def test_forged_verdict_through_the_runner(level, name):
    program, tests = FORGED[name]
    r = check_program(program, tests, timeout_s=5, isolation=level)
    assert not r.passed and r.status != "passed", (name, r)


@pytest.mark.parametrize("level", LEVELS)
def test_program_exceptions_arrive_as_one_type(level):
    prog = "def f(x):\n    raise {}('why')\n"
    tests = ("try:\n    f(1)\nexcept Exception as e:\n    print('GOT', type(e).__name__, e)\n")
    for name in ("StopIteration", "ValueError", "KeyboardInterrupt", "SystemExit", "AssertionError"):
        r = check_program(prog.format(name), tests, timeout_s=5, isolation=level)
        assert r.passed and f"GOT ProgramError {name}: why" in r.stdout, (name, r)


@pytest.mark.parametrize("level", LEVELS)
def test_no_main_module_imported_for_the_program(level):
    """A module the program names is never one whose import runs code (`*.__main__`): an honest
    program that names unittest.__main__ still passes, and unittest never ran in the runner."""
    prog = ("def f(x):\n    return 2 * x\n" + "ENTRIES = [['u', 'm', 'unittest.__main__'], ['v', 'm', 'venv.__main__'], "
            "['t', 'm', 'this'], ['p', 'm', '_thread']]\n" + _INJECT)
    r = check_program(prog, "assert f(2) == 4\nassert 'u' not in dir() and 'p' not in dir()\n", timeout_s=10,
                      isolation=level)
    assert r.passed, r
    assert "Ran " not in r.stderr and "Beautiful is better" not in r.stdout, r


@pytest.mark.parametrize("level", LEVELS)
def test_stdlib_modules_still_cross(level):
    prog = "import math\nimport collections.abc as cabc\nimport os.path as osp\n" + "def f(x):\n    return 2 * x\n"
    tests = "assert math.sqrt(4) == 2 and cabc.Sequence and osp.join('a', 'b') == 'a/b' and f(2) == 4\n"
    assert check_program(prog, tests, timeout_s=5, isolation=level).passed


@pytest.mark.parametrize("level", LEVELS)
def test_honest_big_ints_cross_the_wire(level):
    """Ints past Python's 4,300-digit str conversion limit, both ways (answers and arguments)."""
    prog = "def f(n):\n    return 10 ** n\n\ndef g(x):\n    return x + 1\n\ndef h(n):\n    return -(7 ** n), [3 ** n]\n"
    tests = ("assert f(5000) == 10 ** 5000\nassert f(100000) == 10 ** 100000\n"
             "assert g(7 ** 9000) == 7 ** 9000 + 1\nassert h(20000) == (-(7 ** 20000), [3 ** 20000])\n")
    r = check_program(prog, tests, timeout_s=10, isolation=level)
    assert r.passed, r
    # still bounded by the line limit: an int of 300 million bits does not cross
    r = check_program("def f(n):\n    return 1 << (300 * 2**20)\n", "assert f(1) == 1 << (300 * 2**20)\n",
                      timeout_s=10, isolation=level)
    assert not r.passed
