"""A trained model carries the self-correction settings it was trained with (final_model/score_settings.json):
score-train writes them, score-eval and score-generate use them by default and say so, and a flag still wins."""
import json
import os

import pytest

from score_train import trained_settings
from score_train.commands.eval import parse_args as parse_eval
from score_train.commands.generate import parse_args as parse_generate
from score_train.config_io import load_config, preset_path
from tests.helpers import fake_reward, save_tiny_llama

CARRIED = {"instruction": "Please solve the problem again.", "reply_prefix": "Let me recompute: ", "style": "plain",
           "max_new_tokens": 96, "num_turns": 3, "task": "arithmetic", "algo": "score"}


@pytest.fixture
def trained_dir(tmp_path):
    d = tmp_path / "final_model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / trained_settings.FILE).write_text(json.dumps(CARRIED))
    return d


def test_score_eval_uses_the_carried_settings_and_says_so(trained_dir, capsys):
    cfg, _ = parse_eval(["--model", str(trained_dir), "--task", "arithmetic"])
    assert (cfg.rollout.instruction, cfg.rollout.reply_prefix, cfg.rollout.max_new_tokens, cfg.evaluate.num_turns) \
        == ("Please solve the problem again.", "Let me recompute: ", 96, 3)
    err = capsys.readouterr().err
    assert "score-eval: using the settings" in err and "rollout.reply_prefix='Let me recompute: '" in err


def test_an_explicit_flag_wins_over_the_carried_settings(trained_dir, capsys):
    cfg, _ = parse_eval(["--model", str(trained_dir), "--instruction", "Check it.", "--max-new-tokens", "64",
                         "--evaluate.num_turns=2"])
    assert cfg.rollout.instruction == "Check it." and cfg.rollout.max_new_tokens == 64
    assert cfg.evaluate.num_turns == 2 and cfg.rollout.reply_prefix == "Let me recompute: "
    assert "rollout.instruction" not in capsys.readouterr().err.split("(score_settings.json)")[-1]


def test_score_generate_uses_the_carried_turn2_text(trained_dir, tmp_path, capsys):
    cfg, _ = parse_generate(["--model", str(trained_dir), "--input", "p.jsonl", "--output", str(tmp_path / "o.jsonl")])
    assert cfg.rollout.instruction == CARRIED["instruction"] and cfg.rollout.reply_prefix == CARRIED["reply_prefix"]
    assert "score-generate: using the settings" in capsys.readouterr().err


def test_a_model_without_the_file_keeps_the_defaults(tmp_path, capsys):
    d = tmp_path / "plain"
    d.mkdir()
    (d / "config.json").write_text("{}")
    cfg, _ = parse_eval(["--model", str(d)])
    assert cfg.rollout.instruction == "" and cfg.rollout.reply_prefix == "" and cfg.evaluate.num_turns == 2
    assert "using the settings" not in capsys.readouterr().err


def test_the_export_writes_the_training_settings(tmp_path, monkeypatch):
    from score_train import train as T

    monkeypatch.setattr(T, "make_reward_fn", lambda cfg: fake_reward)
    model_dir = save_tiny_llama(tmp_path / "tiny")
    cfg = load_config(preset_path("demo"), [
        f"--model.spec={model_dir}", f"--run.out_dir={tmp_path}", "--run.name=t", "--run.progress=false",
        "--data.train_size=8", "--data.eval_size=2", "--rollout.prompts_per_step=2", "--rollout.n=2",
        "--rollout.max_new_tokens=4", "--run.device=cpu", "--algo.stage1_steps=1", "--algo.stage2_steps=0",
        "--eval.before=false"])
    run = T.train(cfg)["run_dir"]
    saved = trained_settings.read(os.path.join(run, "final_model"))
    assert saved["instruction"] == cfg.rollout.instruction == "Please solve the problem again."
    assert saved["reply_prefix"] == "Let me recompute: " and saved["max_new_tokens"] == 4 and saved["num_turns"] == 2
