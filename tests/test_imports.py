"""The package's shape, read from its source: no import circle in score_train, the commands on the top floor (no
library module imports them), and no caller that inspects a rollout's signature or probes its attributes."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "score_train")


def _modules() -> dict[str, str]:
    """score_train's modules: dotted name -> path."""
    out = {}
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(d, f)
    return out


MODULES = _modules()


def _imports(name: str, path: str) -> set[str]:
    """The score_train modules `name` imports anywhere in its file (module level or inside a function)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:  # `from score_train import algos`: the module score_train.algos
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return {m for m in out if m in MODULES and m != name}


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(GRAPH):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_the_walk_sees_the_package():
    assert {"score_train.train", "score_train.commands.train", "score_train.rollout.engine"} <= set(MODULES)
    assert "score_train.config" in GRAPH["score_train.commands.train"]


def test_no_import_circle_in_score_train():
    cycle = _cycle()
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_library_module_imports_a_command():
    bad = {m: sorted(n for n in deps if n.startswith("score_train.commands"))
           for m, deps in GRAPH.items() if not m.startswith("score_train.commands") and m != "score_train.__main__"}
    assert not {m: d for m, d in bad.items() if d}


@pytest.mark.parametrize("needle", ["inspect.signature(rollout", "hasattr(rollout", "getattr(rollout", "captures_prefix"])
def test_no_caller_sniffs_a_rollout(needle):
    hits = [m for m, p in MODULES.items() if needle in open(p, encoding="utf-8").read()]
    assert not hits, f"{needle} in {hits}"


def test_one_make_rollout():
    defs = [m for m, p in MODULES.items()
            if any(isinstance(n, ast.FunctionDef) and n.name == "make_rollout" for n in ast.walk(ast.parse(open(p).read())))]
    assert defs == ["score_train.rollout"]
