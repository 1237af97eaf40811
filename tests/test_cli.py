"""The three commands' errors: one readable line and exit code 2, found before the model loads, and no run
directory left behind (issue 16, section 5). In-process through the commands' main(argv), plus one
subprocess for the real exit status."""
import json
import os
import subprocess
import sys

import pytest
import torch

from score_train.commands.eval import main as eval_main
from score_train.commands.generate import main as generate_main
from score_train.commands.train import main as train_main
from score_train.config import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ModelLoaded(Exception):
    """Raised by the patched load_model: the command got as far as loading the model."""


@pytest.fixture(autouse=True)
def no_model_load(monkeypatch):
    import score_train.model

    def load_model(*a, **k):
        raise ModelLoaded

    monkeypatch.setattr(score_train.model, "load_model", load_model)


@pytest.fixture
def files(tmp_path):
    """A directory that passes the model check (the load itself is patched out) and some task files."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "bad.jsonl").write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?", "answer": \n')
    (tmp_path / "odd.jsonl").write_text('{"problem": "1+1?", "answer": "2"}\n{"question": "x"}\n')
    good = "".join(json.dumps({"problem": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(40))
    (tmp_path / "good.jsonl").write_text(good)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "What is 2 + 2?"}\n')
    (tmp_path / "bad_prompts.jsonl").write_text('{"prompt": "What is 2 + 2?"}\n{"prompt": \n')
    return tmp_path


def one_error_line(err: str, prog: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: ") and "Traceback" not in err, err
    return lines[0]


def train_args(files, *extra):
    return [f"--model.spec={files / 'model'}", f"--run.out_dir={files / 'runs'}", "--run.name=t",
            "--run.progress=false", *extra]


@pytest.mark.parametrize("extra, msg", [
    (["--model.spec=/nonexistent/model"], "model.spec: /nonexistent/model is not a local directory"),
    (["--data.task=jsonl:{d}/missing.jsonl"], "missing.jsonl"),
    (["--data.task=jsonl:{d}/empty.jsonl"], "empty.jsonl: no records"),
    (["--data.task=jsonl:{d}/bad.jsonl"], "bad.jsonl:2: invalid JSON"),
    (["--data.task=jsonl:{d}/odd.jsonl"], "odd.jsonl:2: unknown record format"),
    (["--config={d}/missing.yaml"], "--config: no such file"),
    (["--data.ops=+,/"], "data.ops: unknown operation(s) '/'"),
    (["--data.task=mnist"], "data.task: unknown task 'mnist'"),
    (["--run.threads=-3"], "run.threads must be >= 0"),
    (["--optim.lr=-1e-5"], "optim.lr must be >= 0"),
    (["--rollout.temperature=0"], "rollout.temperature must be > 0 for score"),
    (["--algo.nme=x"], "unknown config key 'algo.nme'"),
])
def test_train_bad_input_one_line_exit_2_nothing_left(files, capsys, extra, msg):
    extra = [e.replace("{d}", str(files)) for e in extra]
    assert train_main(train_args(files, *extra)) == 2
    line = one_error_line(capsys.readouterr().err, "score-train")
    assert msg in line, line
    assert not os.path.exists(files / "runs"), os.listdir(files / "runs")  # no run directory behind


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_train_missing_device(files, capsys):
    assert train_main(train_args(files, "--run.device=cuda")) == 2
    assert "torch sees no CUDA device" in one_error_line(capsys.readouterr().err, "score-train")


def test_train_checks_come_before_the_model_load_and_failures_do_not_shift_the_name(files, capsys):
    # a failed start, then a good one: the good one gets runs/t (not runs/t-1), and only then loads the model
    assert train_main(train_args(files, "--data.task=jsonl:" + str(files / "bad.jsonl"))) == 2
    with pytest.raises(ModelLoaded):
        train_main(train_args(files, "--data.task=jsonl:" + str(files / "good.jsonl")))
    assert sorted(os.listdir(files / "runs")) == ["t"]
    assert os.path.exists(files / "runs" / "t" / "config.yaml")


def test_debug_shows_the_traceback(files):
    with pytest.raises(UsageError, match="run.threads"):
        train_main(train_args(files, "--run.threads=-3", "--debug"))


def test_help(capsys):
    import dataclasses

    from score_train.config import Config

    assert train_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "score-train" in out and "--optim.lr [1e-05]" in out and "adam_beta1" in out
    words = " ".join(out.split())
    for sec in dataclasses.fields(Config):  # every setting, with its default and its help text
        for f in dataclasses.fields(sec.default_factory):
            assert f"--{sec.name}.{f.name} [" in out, f"{sec.name}.{f.name} missing from --help"
            assert f.metadata.get("help") and " ".join(f.metadata["help"].split()) in words, f"{sec.name}.{f.name}"
    for main, flag in ((eval_main, "--n-problems"), (generate_main, "--two-turn")):
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        assert e.value.code == 0 and flag in capsys.readouterr().out


@pytest.mark.parametrize("extra, msg", [
    (["--model", "/nonexistent/model"], "model.spec: /nonexistent/model is not a local directory"),
    (["--task", "jsonl:{d}/bad.jsonl"], "bad.jsonl:2: invalid JSON"),
    (["--task", "jsonl:{d}/missing.jsonl"], "missing.jsonl"),
    (["--task", "mnist"], "data.task: unknown task 'mnist'"),
    (["--ops", "+/"], "data.ops: unknown operation(s) '/'"),
    (["--out", "/nonexistent_dir/r.json"], "evaluate.out: the directory /nonexistent_dir does not exist"),
    (["--n-problems", "0"], "data.eval_size must be >= 1"),
    (["--config", "{d}/missing.yaml"], "--config: no such file"),
    (["--bogus", "1"], "unknown option --bogus"),
])
def test_eval_bad_input(files, capsys, extra, msg):
    extra = [e.replace("{d}", str(files)) for e in extra]
    assert eval_main(["--model", str(files / "model"), *extra]) == 2
    assert msg in one_error_line(capsys.readouterr().err, "score-eval")


def test_eval_checks_come_before_the_model_load(files):
    with pytest.raises(ModelLoaded):
        eval_main(["--model", str(files / "model"), "--task", "jsonl:" + str(files / "good.jsonl"), "--k", "0"])


@pytest.mark.parametrize("extra, msg", [
    (["--output", "/nonexistent_dir/o.jsonl"], "generate.output: the directory /nonexistent_dir does not exist"),
    (["--input", "{d}/missing.jsonl"], "generate.input: no such file"),
    (["--input", "{d}/bad_prompts.jsonl"], "bad_prompts.jsonl:2: not valid JSON"),
    (["--model", "/nonexistent/m.gguf"], "model.spec: no such file: /nonexistent/m.gguf"),
    (["--n", "0"], "rollout.n must be >= 1"),
])
def test_generate_bad_input_fails_at_once(files, capsys, extra, msg):
    extra = [e.replace("{d}", str(files)) for e in extra]
    args = {"--model": str(files / "model"), "--input": str(files / "prompts.jsonl"), "--output": str(files / "o.jsonl")}
    for k, v in zip(extra[::2], extra[1::2]):
        args[k] = v
    assert generate_main([x for kv in args.items() for x in kv]) == 2
    assert msg in one_error_line(capsys.readouterr().err, "score-generate")
    assert not os.path.exists(files / "o.jsonl")


def test_exit_status_from_the_real_command(tmp_path):
    res = subprocess.run([sys.executable, "-m", "score_train", "--run.threads=-3", f"--run.out_dir={tmp_path}"],
                         check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert [x for x in res.stderr.splitlines() if "error:" in x] == [
        x for x in res.stderr.splitlines() if x.startswith("score-train: error: run.threads must be >= 0")]
    assert os.listdir(tmp_path) == []
