import pytest

from score_train.config import PRESETS, Config, load_config, parse_args, preset_path


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


def test_packaged_presets_match_repo_copies():
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    for name in PRESETS:
        with open(os.path.join(root, f"{name}.yaml")) as a, open(preset_path(name)) as b:
            assert a.read() == b.read(), f"configs/{name}.yaml and score_train/configs/{name}.yaml differ"
