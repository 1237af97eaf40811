import pytest

from score_train.commands.train import parse_args
from score_train.config import (
    PRESETS,
    TASK_DEFAULTS,
    Config,
    EvalCommandConfig,
    GenerateCommandConfig,
    UsageError,
    resolve,
)
from score_train.config_io import load_config, merge_resume, preset_path


def test_defaults_validate():
    cfg = Config().validate()
    assert cfg.algo.name == "score" and cfg.rollout.n >= 1


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(name):
    cfg = load_config(preset_path(name))
    assert cfg.run.name == name


def test_no_args_is_demo():
    cfg, flags = parse_args([])
    assert cfg.run.name == "demo" and cfg.model.spec == "embedded" and cfg.data.task == "arithmetic"
    assert flags == {}


def test_overrides_nested_and_typed(tmp_path):
    cfg, _ = parse_args(["--preset", "demo", "--optim.lr=3e-6", "--algo.name=multi-turn-rl", "--rollout.n=2",
                         "--data.ops=+,-", "--run.tensorboard=true", "--resume"])
    assert cfg.optim.lr == 3e-6 and isinstance(cfg.optim.lr, float)
    assert cfg.algo.name == "multi-turn-rl" and cfg.rollout.n == 2
    assert cfg.data.ops == ["+", "-"] and cfg.run.tensorboard is True and cfg.run.resume is True


def test_pools_take_sentences_on_the_command_line():
    """The turn-2 pools are '|'-separated, so an entry may hold commas, and keep their spaces (an opening ends in
    one); the comma lists stay trimmed."""
    cfg, _ = parse_args(["--rollout.instruction_pool=Once more, please.|Check it.",
                         "--rollout.reply_prefix_pool=Let me check: |none", "--data.ops= +, -"])
    assert cfg.rollout.instruction_pool == ["Once more, please.", "Check it."]
    assert cfg.rollout.reply_prefix_pool == ["Let me check: ", "none"] and cfg.data.ops == ["+", "-"]
    with pytest.raises(UsageError, match="rollout.instruction_pool repeats an entry"):
        parse_args(["--rollout.instruction_pool=A.|A."])


def test_change_bonus_takes_a_jsonl_task_whose_kind_is_read_later():
    """A jsonl task's kind is known once its records are read (algos.changed_after_wrong refuses code then), so
    the config does not refuse the bonus for it up front."""
    cfg, _ = parse_args(["--data.task=jsonl:/tmp/problems.jsonl", "--algo.change_bonus=0.2"])
    assert cfg.algo.change_bonus == 0.2


def test_yaml_file_and_override_order(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("algo:\n  name: single-turn-rl\n  steps: 3\noptim:\n  lr: 1.0e-4\n")
    cfg, _ = parse_args(["--config", str(p), "--algo.steps=5"])
    assert cfg.algo.name == "single-turn-rl" and cfg.algo.steps == 5 and cfg.optim.lr == 1e-4


@pytest.mark.parametrize("bad, msg", [
    (["--optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["--rollout.n=two"], "rollout.n: expected an integer"),
    (["--rollout.n=1.5"], "rollout.n: expected an integer"),
    (["--algo.name=ppo"], "algo.name must be one of"),
    (["--algo.kl=k9"], "algo.kl"),
    (["--run.resume=maybe"], "run.resume: expected true/false"),
    (["stray"], "unexpected argument"),
    (["--optim=1"], "optim: expected a mapping"),
])
def test_bad_config_is_rejected(bad, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
        parse_args(bad)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        parse_args(["--preset", "nope"])


def test_presets_are_packaged_once():
    """The presets live in one place, inside the package (score_train/configs/), and the wheel ships them."""
    import os

    import tomllib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert not os.path.exists(os.path.join(root, "configs")), "a second copy of the presets is back in configs/"
    pkg = os.path.join(root, "score_train", "configs")
    for name in PRESETS:
        assert os.path.samefile(preset_path(name), os.path.join(pkg, f"{name}.yaml"))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        data = tomllib.load(f)
    assert "configs/*.yaml" in data["tool"]["setuptools"]["package-data"]["score_train"]


# ---------------------------------------------------------------- one surface, each default once

def test_task_defaults_are_the_one_budget():
    from score_train.data.records import KINDS

    assert set(TASK_DEFAULTS) == set(KINDS)
    assert TASK_DEFAULTS["arithmetic"]["max_new_tokens"] == 128
    assert TASK_DEFAULTS["math"]["max_new_tokens"] == TASK_DEFAULTS["code"]["max_new_tokens"] == 512
    for cls in (Config, EvalCommandConfig, GenerateCommandConfig):
        assert cls().rollout.max_new_tokens == 0  # = the task's default, for every command
    for kind, d in TASK_DEFAULTS.items():
        r = resolve(Config(), kind)
        assert r.rollout.max_new_tokens == d["max_new_tokens"] and r.eval.max_new_tokens == d["max_new_tokens"]
        assert resolve(EvalCommandConfig(), kind).rollout.max_new_tokens == d["max_new_tokens"]
        assert resolve(GenerateCommandConfig(), kind).rollout.max_new_tokens == d["max_new_tokens"]
    cfg = load_config(None, ["--rollout.max_new_tokens=40"])
    r = resolve(cfg, "math")
    assert r.rollout.max_new_tokens == 40 and r.eval.max_new_tokens == 40  # eval follows the rollout's
    assert resolve(load_config(None, ["--eval.max_new_tokens=7"]), "math").eval.max_new_tokens == 7
    assert cfg.rollout.max_new_tokens == 40 and cfg.eval.max_new_tokens == 0  # resolve returns a copy


def test_one_temperature_default_and_shared_flags():
    from score_train.commands.eval import parse_args as parse_eval_args
    from score_train.commands.generate import parse_args as parse_generate_args

    t = Config().rollout.temperature
    assert EvalCommandConfig().rollout.temperature == GenerateCommandConfig().rollout.temperature == t == 1.0
    e, _ = parse_eval_args(["--model", "m", "--task", "jsonl:x.jsonl", "--n-problems", "3", "--k", "1",
                            "--temperature", "0.5", "--max-new-tokens", "6", "--ops", "+-", "--no-greedy",
                            "--backend", "auto", "--seed", "3", "--device", "cpu", "--no-samples"])
    assert (e.model.spec, e.data.task, e.data.eval_size, e.evaluate.k) == ("m", "jsonl:x.jsonl", 3, 1)
    assert e.rollout.temperature == 0.5 and e.rollout.max_new_tokens == 6 and e.data.ops == ["+", "-"]
    assert e.evaluate.greedy is False and e.evaluate.samples is False and e.rollout.engine == "engine"
    assert e.data.seed == 3 and e.run.seed == 3 and e.run.device == "cpu"
    # the dotted names are the same surface
    e2, _ = parse_eval_args(["--model.spec=m", "--rollout.temperature=0.5", "--evaluate.k", "1"])
    assert e2.model.spec == "m" and e2.rollout.temperature == 0.5 and e2.evaluate.k == 1
    g, _ = parse_generate_args(["--model", "embedded", "--input", "p.jsonl", "--output", "o.jsonl", "--two-turn",
                                "--n", "4", "--stop", "A", "--stop", "B", "--top-k", "5"])
    assert g.generate.two_turn is True and g.rollout.n == 4 and g.generate.stop == ["A", "B"]
    assert g.generate.top_k == 5 and g.generate.input == "p.jsonl"
    # the turn-2 instruction is one key for all three commands
    g, _ = parse_generate_args(["--input", "p.jsonl", "--output", "o.jsonl", "--instruction", "Again."])
    e, _ = parse_eval_args(["--model", "m", "--rollout.instruction=Again."])
    assert g.rollout.instruction == e.rollout.instruction == "Again."
    assert load_config(None, ["--rollout.instruction=Again."]).rollout.instruction == "Again."
    assert Config().rollout.instruction == "" and not hasattr(g.generate, "instruction")
    # text settings are taken as written: "a: b" is not a YAML mapping, "1" is not a number, on every path
    g, _ = parse_generate_args(["--input", "p.jsonl", "--output", "o.jsonl", "--reply-prefix", "Let me see: "])
    e, _ = parse_eval_args(["--model", "m", "--reply-prefix", "Let me see: ", "--instruction", "1"])
    c = load_config(None, ["--rollout.reply_prefix=Let me see: ", "--rollout.instruction=Check: it."])
    assert g.rollout.reply_prefix == e.rollout.reply_prefix == c.rollout.reply_prefix == "Let me see: "
    assert e.rollout.instruction == "1" and c.rollout.instruction == "Check: it."


def test_adam_betas_do_not_clash_with_the_kl_coefficients(tmp_path, capsys):
    cfg = load_config(None, ["--optim.adam_beta1=0.8", "--optim.adam_beta2=0.99", "--algo.beta1=0.02"])
    assert (cfg.optim.adam_beta1, cfg.optim.adam_beta2, cfg.algo.beta1) == (0.8, 0.99, 0.02)
    assert not hasattr(cfg.optim, "beta1")
    # an older config.yaml (or command line) still loads, read under the new name, with a note
    old = tmp_path / "old.yaml"
    old.write_text("optim:\n  beta1: 0.7\n  beta2: 0.9\nalgo:\n  beta1: 0.03\n")
    cfg = load_config(str(old))
    assert (cfg.optim.adam_beta1, cfg.optim.adam_beta2, cfg.algo.beta1) == (0.7, 0.9, 0.03)
    assert "optim.beta1 is now optim.adam_beta1" in capsys.readouterr().err
    assert load_config(None, ["--optim.beta2=0.5"]).optim.adam_beta2 == 0.5
    both = tmp_path / "both.yaml"
    both.write_text("optim:\n  beta1: 0.7\n  adam_beta1: 0.8\n")
    with pytest.raises(UsageError, match="both given"):
        load_config(str(both))


@pytest.mark.parametrize("bad, msg", [
    (["--run.threads=-3"], "run.threads must be >= 0"),
    (["--optim.lr=-1e-5"], "optim.lr must be >= 0"),
    (["--data.ops=+,/"], "data.ops: unknown operation"),
    (["--data.task=mnist"], "data.task: unknown task 'mnist'"),
    (["--data.task=jsonl:"], "data.task: unknown task"),
    (["--rollout.top_p=0"], "rollout.top_p"),
    (["--rollout.max_new_tokens=-1"], "rollout.max_new_tokens must be >= 0"),
    (["--data.eval_size=0"], "data.eval_size must be >= 1"),
    (["--run.device=gpu"], "run.device"),
    (["--algo.agg=mean"], "algo.agg"),
    (["--config", "/nonexistent/c.yaml"], "--config: no such file"),
    (["--model.dtype=float16"], "model.dtype"),  # training in fp16 is not offered
    (["--algo.change_bonus=-1"], "algo.change_bonus must be >= 0"),
    (["--algo.change_bonus=0.2", "--algo.name=single-turn-rl"], "algo.change_bonus applies to two-turn"),
    (["--algo.change_bonus=0.2", "--rollout.turn2_n=2"], "algo.change_bonus needs rollout.turn2_n=1"),
    (["--preset", "code", "--algo.change_bonus=0.2"], "algo.change_bonus compares the turns' stated answers"),
])
def test_bad_values_are_usage_errors(bad, msg):
    with pytest.raises(UsageError, match=msg.replace("(", r"\(").replace("+", r"\+")):
        parse_args(bad)


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("algo:\n  name: score\n  steps: [1\n")
    with pytest.raises(UsageError, match=r"c\.yaml:\d+: not valid YAML"):
        parse_args(["--config", str(p)])


def test_eval_reads_a_training_config(tmp_path):
    """score-eval --config runs/X/config.yaml: the model, data and rollout sections; the rest is skipped."""
    from score_train.commands.eval import parse_args as parse_eval_args
    from score_train.config_io import dump_config

    cfg = load_config(preset_path("demo"), ["--data.digits=3", "--rollout.max_new_tokens=20"])
    p = tmp_path / "config.yaml"
    p.write_text(dump_config(cfg))
    e, _ = parse_eval_args(["--config", str(p), "--n-problems", "4"])
    assert e.data.digits == 3 and e.rollout.max_new_tokens == 20 and e.model.spec == "embedded"
    assert e.data.eval_size == 4
    p.write_text("evaluatee:\n  k: 1\n")
    with pytest.raises(UsageError, match="unknown config key 'evaluatee'"):
        parse_eval_args(["--config", str(p)])


def test_resume_merge_takes_safe_changes_only():
    saved = load_config(preset_path("demo"))
    ok, changes = merge_resume(saved, load_config(preset_path("demo"), ["--run.threads=1", "--eval.every=2",
                                                                       "--run.resume=true"]), "runs/demo")
    assert ok.run.threads == 1 and ok.eval.every == 2 and ok.run.resume is True
    assert sorted(c.split(":")[0] for c in changes) == ["eval.every", "run.threads"]
    for bad, key in [(["--algo.stage1_steps=7"], "algo.stage1_steps"), (["--data.seed=4"], "data.seed"),
                     (["--model.spec=/m"], "model.spec"), (["--optim.lr=1e-3"], "optim.lr"),
                     (["--rollout.max_new_tokens=9"], "rollout.max_new_tokens"), (["--run.seed=5"], "run.seed")]:
        with pytest.raises(UsageError, match=f"cannot resume runs/demo with {key}"):
            merge_resume(saved, load_config(preset_path("demo"), bad), "runs/demo")
