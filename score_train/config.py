"""Typed run configuration: nested dataclasses, loaded from YAML, overridden by `--key=value`.

    score-train                                   # the `demo` preset
    score-train --config configs/math.yaml --optim.lr=1e-6 --algo.name=multi-turn-rl
    score-train --preset code --run.name=my_run

Overrides use dotted keys (`--rollout.n=8`); values are parsed as YAML scalars and checked against the
field's type, so a typo in a key or a wrong type fails before anything is loaded.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from importlib import resources

import yaml

ALGOS = ("score", "multi-turn-rl", "single-turn-rl", "star", "pair-sft", "self-refine")
PRESETS = ("demo", "math", "code")


@dataclass
class ModelConfig:
    spec: str = "embedded"  # HF directory, .gguf file, or "embedded" (SmolLM2-135M-Instruct)
    dtype: str = "float32"  # parameter dtype: float32 | bfloat16
    autocast_bf16: bool = False  # bf16 autocast for the training forward (CPU or GPU)
    train_layers: int = 0  # 0 = all; k > 0 trains only the top k decoder layers (+ final norm)
    train_embeddings: bool = True  # the (often tied) embedding / lm_head matrix


@dataclass
class DataConfig:
    task: str = "arithmetic"  # arithmetic | champ | humaneval | jsonl:PATH
    train_size: int = 2048  # problems drawn for training (the stream cycles over them)
    eval_size: int = 256  # held-out problems for every evaluation
    seed: int = 0
    # arithmetic only
    digits: int = 2
    n_operands: int = 2
    ops: list[str] = field(default_factory=lambda: ["+"])
    prompt_format: str = "What is {expr}?"


@dataclass
class AlgoConfig:
    name: str = "score"  # one of ALGOS
    stage1_steps: int = 10  # score only
    stage2_steps: int = 10  # score only; the step count of every other algorithm is steps
    steps: int = 20  # non-score algorithms
    interleave: int = 1  # score: repeat (Stage I, Stage II) this many times, splitting each stage's steps
    estimator: str = "rloo"  # rloo | grpo | reinforce | none
    std_normalize: bool = False
    alpha: float = 10.0  # Stage II shaping bonus alpha * (r2 - r1) on turn 2
    beta1: float = 0.01  # KL on every trained turn
    beta2: float = 0.1  # Stage I KL on turn 1
    kl: str = "k3"  # k1 | k2 | k3 (sampled, from reference log-probs) | exact (full-vocabulary linear_kl)
    clip_eps: float = 0.0  # > 0 turns on PPO clipping (useful with optim.epochs > 1)
    agg: str = "token-mean"
    star_keep_correct: bool = False  # star: also keep correct->correct traces (D+ = only i->c when False)


@dataclass
class RolloutConfig:
    engine: str = "engine"  # engine (paged, prefix-shared) | hf (transformers generate)
    prompts_per_step: int = 8
    n: int = 4  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64  # per turn
    style: str = "plain"  # prompts (score_train.prompts): plain | paper (the paper's math prompts for arithmetic)


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    epochs: int = 1  # optimisation passes over each step's rollouts
    micro_batch_tokens: int = 4096  # packed tokens per forward/backward
    warmup_steps: int = 0


@dataclass
class EvalConfig:
    every: int = 0  # steps between evaluations (0 = only before and after)
    max_new_tokens: int = 0  # 0 = rollout.max_new_tokens
    before: bool = True
    sample_rows: int = 16  # rows of the (problem, y1, y2, rewards) tables


@dataclass
class RunConfig:
    name: str = "demo"
    out_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads, 0 = torch's default
    save_every: int = 0  # steps between checkpoints (0 = only at stage ends and the end)
    keep_checkpoints: int = 2
    resume: bool = False
    export: bool = True  # final HF directory
    tensorboard: bool = False
    wandb: bool = False
    progress: bool = True


@dataclass
class DistConfig:
    """torchrun + FSDP2 (score_train/distributed.py); ignored in a single process."""
    shard_ref: bool = True  # shard the frozen reference too (False: replicate it, for small models)
    activation_checkpointing: bool = False
    timeout_s: float = 1800.0  # collective timeout: a dead rank ends the job instead of hanging it


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def validate(self) -> Config:
        if self.algo.name not in ALGOS:
            raise ValueError(f"algo.name must be one of {ALGOS}, got {self.algo.name!r}")
        if self.algo.kl not in ("k1", "k2", "k3", "exact"):
            raise ValueError(f"algo.kl must be k1, k2, k3 or exact, got {self.algo.kl!r}")
        if self.algo.estimator not in ("rloo", "grpo", "reinforce", "none"):
            raise ValueError(f"algo.estimator must be rloo, grpo, reinforce or none, got {self.algo.estimator!r}")
        if self.rollout.engine not in ("engine", "hf"):
            raise ValueError(f"rollout.engine must be engine or hf, got {self.rollout.engine!r}")
        if self.model.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"model.dtype must be float32 or bfloat16, got {self.model.dtype!r}")
        for k in ("prompts_per_step", "n", "max_new_tokens"):
            if getattr(self.rollout, k) < 1:
                raise ValueError(f"rollout.{k} must be >= 1")
        if self.optim.epochs < 1 or self.algo.interleave < 1:
            raise ValueError("optim.epochs and algo.interleave must be >= 1")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value, tp, key: str):
    """Check / convert a YAML value to the field's declared type."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-6" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        return value if isinstance(value, str) else str(value)
    raise TypeError(f"{key}: unsupported field type {tp}")


def _apply(obj, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ValueError(f"unknown config key {key!r} (known: {', '.join(sorted(prefix + n for n in names))})")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ValueError(f"{key}: expected a mapping")
            _apply(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def preset_path(name: str) -> str:
    """configs/<name>.yaml from the package data (works from an installed wheel)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return str(resources.files("score_train") / "configs" / f"{name}.yaml")


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    if path:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping")
        _apply(cfg, data)
    for item in overrides or []:
        if not item.startswith("--") or "=" not in item:
            raise ValueError(f"override {item!r} must look like --section.key=value")
        key, raw = item[2:].split("=", 1)
        nested: dict = {}
        cur = nested
        parts = key.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
        _apply(cfg, nested)
    return cfg.validate()


def parse_args(argv: list[str] | None) -> tuple[Config, dict]:
    """CLI: [--config FILE | --preset NAME] [--resume] [--section.key=value ...]. No file and no preset = demo."""
    argv = list(argv or [])
    path, preset, overrides, flags = None, None, [], {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            flags["help"] = True
        elif a == "--config" or a == "--preset":
            if i + 1 >= len(argv):
                raise ValueError(f"{a} needs a value")
            if a == "--config":
                path = argv[i + 1]
            else:
                preset = argv[i + 1]
            i += 1
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a.startswith("--preset="):
            preset = a.split("=", 1)[1]
        elif a == "--resume":
            overrides.append("--run.resume=true")
        elif a.startswith("--"):
            overrides.append(a)
        else:
            raise ValueError(f"unexpected argument {a!r}")
        i += 1
    if path and preset:
        raise ValueError("give --config or --preset, not both")
    if path and not os.path.exists(path) and path in PRESETS:
        preset, path = path, None
    if path is None:
        path = preset_path(preset or "demo")
    return load_config(path, overrides), flags


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
