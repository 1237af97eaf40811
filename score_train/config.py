"""The one configuration surface of `score-train`, `score-eval` and `score-generate`.

Typed nested dataclasses, loaded from YAML and overridden by `--section.key=value`:

    score-train                                   # the `demo` preset
    score-train --config my.yaml --optim.lr=1e-6 --algo.name=multi-turn-rl
    score-eval --model.spec=embedded --data.task=arithmetic --data.eval_size=64
    score-generate --model embedded --input p.jsonl --output o.jsonl --two-turn --n 4   # short aliases

The three commands share the sections they need (`model`, `data`, `rollout`, `run`) and each default is
defined once, here; the evaluation and generation commands add one section of their own (`evaluate`,
`generate`). Values are parsed as YAML scalars and checked against the field's type and range, so a typo
in a key, a wrong type or an impossible value fails before anything is loaded, as a `UsageError`: the
commands print its message as one line and exit with status 2.

Token budgets: `rollout.max_new_tokens: 0` means the task's default from `TASK_DEFAULTS`; `resolve`
fills it in once the task's kind is known, so the saved config holds the number that was used.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources

import yaml

from score_train.data.arithmetic import DEFAULT_FORMAT as ARITHMETIC_FORMAT

ALGOS = ("score", "multi-turn-rl", "single-turn-rl", "star", "pair-sft", "self-refine")
MULTI_TURN_ALGOS = ("score", "multi-turn-rl")  # the algorithms that train more than two turns (algo.num_turns)
PRESETS = ("demo", "math", "code")
TASKS = ("arithmetic", "champ", "humaneval", "jsonl:PATH")

# Per-task defaults, by the kind of the task's records. max_new_tokens is per turn: at 128 tokens 18 of 512
# greedy turn-1 answers of the base SmolLM2 to two-digit additions (the task's default prompt) hit the limit,
# 3.5% (the bare "What is {expr}?": 7.2%; at 32 tokens 204 of 256 were cut).
TASK_DEFAULTS: dict[str, dict] = {
    "arithmetic": {"max_new_tokens": 128},
    "math": {"max_new_tokens": 512},
    "code": {"max_new_tokens": 512},
}
TASK_KINDS = {"arithmetic": "arithmetic", "champ": "math", "humaneval": "code"}  # jsonl: read from the file

# Keys renamed since older configs were saved: still read, with a note.
RENAMED = {"optim.beta1": "optim.adam_beta1", "optim.beta2": "optim.adam_beta2"}

# What may differ when a run is resumed: how it runs and reports, never what it computes.
RESUME_SAFE = frozenset({
    "run.threads", "run.progress", "run.device", "run.save_every", "run.keep_checkpoints", "run.export",
    "run.tensorboard", "run.wandb", "run.resume", "eval.every", "eval.before", "eval.sample_rows",
    "dist.timeout_s", "dist.activation_checkpointing", "dist.shard_ref",
})
RUN_IDENTITY = frozenset({"run.name", "run.out_dir"})  # they name the run directory, so they never differ


class UsageError(ValueError):
    """A problem with the command line, the config or an input file, found before any work is done."""


def _need(ok: bool, msg: str):
    if not ok:
        raise UsageError(msg)


def _one_of(value, allowed, key: str):
    _need(value in allowed, f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}")


# ---------------------------------------------------------------------------- sections

@dataclass
class ModelConfig:
    spec: str = "embedded"  # HF directory, .gguf file, or "embedded" (SmolLM2-135M-Instruct)
    dtype: str = "float32"  # parameter dtype: float32 | bfloat16 (float16: score-eval / score-generate only)
    autocast_bf16: bool = False  # bf16 autocast for the training forward (CPU or GPU)
    train_layers: int = 0  # 0 = all; k > 0 trains only the top k decoder layers (+ final norm)
    train_embeddings: bool = True  # the (often tied) embedding / lm_head matrix (never with LoRA)
    # > 0: train peft LoRA adapters of this rank on every linear projection of the trained layers instead of
    # their weights (all weights frozen, embeddings and norms included); the KL reference is the model with its
    # adapters off. The export merges them (final_model) and also writes the peft adapter (final_adapter).
    lora_rank: int = 0
    lora_alpha: float = 32.0  # LoRA scale = lora_alpha / lora_rank

    def check(self, *, training: bool):
        _need(bool(self.spec), "model.spec is empty: give a local HF directory, a .gguf file or 'embedded'")
        _one_of(self.dtype, ("float32", "bfloat16") if training else ("float32", "bfloat16", "float16"),
                "model.dtype")
        _need(self.train_layers >= 0, f"model.train_layers must be >= 0 (0 = all); got {self.train_layers}")
        _need(self.lora_rank >= 0, f"model.lora_rank must be >= 0 (0 = no LoRA); got {self.lora_rank}")
        _need(self.lora_alpha > 0, f"model.lora_alpha must be > 0; got {self.lora_alpha}")
        _need(training or self.lora_rank == 0, "model.lora_rank is a training setting: evaluate or generate with "
              "the run's merged final_model (or a checkpoint through benchmarks/demo_sweep.py audit)")


@dataclass
class DataConfig:
    task: str = "arithmetic"  # arithmetic | champ | humaneval | jsonl:PATH
    train_size: int = 2048  # problems drawn for training (the stream cycles over them)
    eval_size: int = 256  # held-out problems for every evaluation (a number >= the split's size: all of it)
    seed: int = 0
    # arithmetic only
    digits: int = 2
    n_operands: int = 2
    ops: list[str] = field(default_factory=lambda: ["+"])
    prompt_format: str = ARITHMETIC_FORMAT  # defined once, in score_train.data.arithmetic

    def check(self):
        from score_train.data.arithmetic import OPS

        t = self.task
        _need(t in TASK_KINDS or (t.startswith("jsonl:") and len(t) > len("jsonl:")),
              f"data.task: unknown task {t!r}; tasks: {', '.join(TASKS)}")
        _need(self.train_size >= 1, f"data.train_size must be >= 1; got {self.train_size}")
        _need(self.eval_size >= 1, f"data.eval_size must be >= 1 (a number >= the split's size takes all of it); "
                                   f"got {self.eval_size}")
        bad = [o for o in self.ops if o not in OPS]
        _need(self.ops and not bad, f"data.ops: unknown operation(s) {', '.join(map(repr, bad)) or '(none given)'}; "
                                    f"choose from {', '.join(OPS)} (comma-separated, e.g. --data.ops=+,-)")
        _need(self.digits >= 1, f"data.digits must be >= 1; got {self.digits}")
        _need(self.n_operands >= 2, f"data.n_operands must be >= 2; got {self.n_operands}")
        _need("{expr}" in self.prompt_format, "data.prompt_format must contain '{expr}'")


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
    beta1: float = 0.01  # KL coefficient on every trained turn (the paper's beta_1)
    beta2: float = 0.1  # Stage I KL coefficient on turn 1 (the paper's beta_2)
    kl: str = "k3"  # k1 | k2 | k3 (sampled, from reference log-probs) | exact (full-vocabulary linear_kl)
    clip_eps: float = 0.0  # > 0 turns on PPO clipping (useful with optim.epochs > 1)
    agg: str = "token-mean"  # token-mean | seq-mean-token-sum | seq-mean-token-mean
    star_keep_correct: bool = False  # star: also keep correct->correct traces (D+ = only i->c when False)
    num_turns: int = 2  # attempts per episode: 3 adds a third (score, multi-turn-rl; the paged engine)

    def check(self):
        if self.name not in ALGOS:  # message kept: "algo.name must be one of"
            raise UsageError(f"algo.name must be one of {ALGOS}, got {self.name!r}")
        _one_of(self.kl, ("k1", "k2", "k3", "exact"), "algo.kl")
        _one_of(self.estimator, ("rloo", "grpo", "reinforce", "none"), "algo.estimator")
        _one_of(self.agg, ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"), "algo.agg")
        for k in ("stage1_steps", "stage2_steps", "steps"):
            _need(getattr(self, k) >= 0, f"algo.{k} must be >= 0; got {getattr(self, k)}")
        _need(self.interleave >= 1, f"algo.interleave must be >= 1; got {self.interleave}")
        for k in ("beta1", "beta2", "clip_eps"):
            _need(getattr(self, k) >= 0, f"algo.{k} must be >= 0; got {getattr(self, k)}")
        _need(self.num_turns >= 2, f"algo.num_turns must be >= 2 (the first attempt and at least one correction); "
                                   f"got {self.num_turns}")
        _need(self.num_turns == 2 or self.name in (*MULTI_TURN_ALGOS, "self-refine"),
              f"algo.num_turns={self.num_turns} applies to {', '.join(MULTI_TURN_ALGOS)} and self-refine; "
              f"{self.name} trains two turns")


@dataclass
class RolloutConfig:
    """Sampling, for training rollouts, score-eval's sampled pass and score-generate."""
    engine: str = "engine"  # engine (paged, prefix-shared) | hf (transformers generate)
    prompts_per_step: int = 8  # training only
    n: int = 4  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 0  # per turn; 0 = the task's default (TASK_DEFAULTS)
    style: str = "plain"  # prompts (score_train.prompts): plain | paper (the paper's math prompts for arithmetic)
    # the message after each turn but the last, in training, every evaluation and score-generate;
    # "" = the task's own (prompts.self_correction_instruction)
    instruction: str = ""
    # fixed text that every reply after the instruction starts with, in training, every evaluation and
    # score-generate: context like the instruction (never trained; the turn's text, its reward and its answer
    # are what the model writes after it). "" = none. The demo's "Let me recompute: " makes the base model re-derive
    # the sum in turn 2 instead of restating turn 1 (docs/trainer.md, "The turn-2 opening")
    reply_prefix: str = ""
    # training: the engine keeps each sample's residual after the frozen bottom layers (model.train_layers), so
    # the update skips them; costs B x tokens x d activations held from sampling to the update
    reuse_prefix: bool = True
    # training rollouts only: "bfloat16" samples with a bf16 copy of the weights (cast once per step; the policy,
    # the update and every evaluation stay in the model's dtype). About 2x faster rollouts on a CPU with AMX-BF16
    # (benchmarks/results/cpu_engine_bf16_2026-12-03.json); the sampler's log-probs then differ from the fp32
    # trainer's by bf16 rounding, which the REINFORCE update (one epoch, no clipping) never reads
    dtype: str = "model"  # model (sample in the policy's own dtype) | bfloat16
    # training rollouts only: turn-2 samples per turn 1 (score, multi-turn-rl; the paged engine). m > 1 forks each
    # sampled turn 1 into m turn-2 branches over its cached KV; turn 2's advantage baseline is then its siblings
    # (same y1), turn 1 is trained once per distinct y1 against the prompt's other y1s
    turn2_n: int = 1

    def check(self):
        _one_of(self.engine, ("engine", "hf"), "rollout.engine")
        _one_of(self.dtype, ("model", "bfloat16"), "rollout.dtype")
        _need(self.dtype == "model" or self.engine == "engine",
              f"rollout.dtype={self.dtype} needs rollout.engine=engine (the HF baseline samples the model as it is)")
        _one_of(self.style, ("plain", "paper"), "rollout.style")
        for k in ("prompts_per_step", "n", "turn2_n"):
            if getattr(self, k) < 1:
                raise UsageError(f"rollout.{k} must be >= 1")
        _need(self.max_new_tokens >= 0, f"rollout.max_new_tokens must be >= 0 (0 = the task's default); "
                                        f"got {self.max_new_tokens}")
        _need(self.temperature >= 0, f"rollout.temperature must be >= 0; got {self.temperature}")
        _need(0 < self.top_p <= 1, f"rollout.top_p must be in (0, 1]; got {self.top_p}")


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9  # AdamW's betas (formerly optim.beta1 / beta2; algo.beta1 / beta2 are KL coefficients)
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8  # AdamW's eps (torch's default): its first step is lr * g / (|g| + eps) per element
    grad_clip: float = 1.0  # 0 = off
    epochs: int = 1  # optimisation passes over each step's rollouts
    micro_batch_tokens: int = 4096  # packed tokens per forward/backward
    warmup_steps: int = 0

    def check(self):
        _need(self.lr >= 0, f"optim.lr must be >= 0; got {self.lr}")
        _need(self.weight_decay >= 0, f"optim.weight_decay must be >= 0; got {self.weight_decay}")
        for k in ("adam_beta1", "adam_beta2"):
            _need(0 <= getattr(self, k) < 1, f"optim.{k} must be in [0, 1); got {getattr(self, k)}")
        _need(self.adam_eps > 0, f"optim.adam_eps must be > 0; got {self.adam_eps}")
        _need(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 = off); got {self.grad_clip}")
        _need(self.epochs >= 1, "optim.epochs and algo.interleave must be >= 1")
        _need(self.micro_batch_tokens >= 1, f"optim.micro_batch_tokens must be >= 1; got {self.micro_batch_tokens}")
        _need(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0; got {self.warmup_steps}")


@dataclass
class EvalConfig:
    """The training run's own evaluations (greedy, on data.eval_size held-out problems)."""
    every: int = 0  # steps between evaluations (0 = only before and after)
    max_new_tokens: int = 0  # 0 = rollout.max_new_tokens
    before: bool = True
    sample_rows: int = 16  # rows of the (problem, y1, y2, rewards) tables

    def check(self):
        for k in ("every", "max_new_tokens", "sample_rows"):
            _need(getattr(self, k) >= 0, f"eval.{k} must be >= 0; got {getattr(self, k)}")


@dataclass
class RunConfig:
    name: str = "demo"
    out_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads, 0 = torch's default
    save_every: int = 0  # steps between checkpoints (0 = only at stage ends and the end)
    keep_checkpoints: int = 2  # 0 = keep all
    resume: bool = False
    export: bool = True  # final HF directory
    tensorboard: bool = False
    wandb: bool = False
    progress: bool = True

    def check(self):
        d = self.device
        _need(d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit()),
              f"run.device must be auto, cpu, cuda or cuda:N; got {d!r}")
        _need(self.threads >= 0, f"run.threads must be >= 0 (0 = torch's default); got {self.threads}")
        _need(self.save_every >= 0, f"run.save_every must be >= 0; got {self.save_every}")
        _need(self.keep_checkpoints >= 0, f"run.keep_checkpoints must be >= 0 (0 = all); got {self.keep_checkpoints}")
        _need(bool(self.name) and os.sep not in self.name and self.name not in (".", ".."),
              f"run.name must be a plain directory name; got {self.name!r}")


@dataclass
class DistConfig:
    """torchrun + FSDP2 (score_train/distributed.py); ignored in a single process."""
    shard_ref: bool = True  # shard the frozen reference too (False: replicate it, for small models)
    activation_checkpointing: bool = False
    timeout_s: float = 1800.0  # collective timeout: a dead rank ends the job instead of hanging it

    def check(self):
        _need(self.timeout_s > 0, f"dist.timeout_s must be > 0; got {self.timeout_s}")


@dataclass
class EvalCommand:
    """score-eval's own settings (the problems are data.task's held-out split, data.eval_size of them)."""
    split: str = "eval"  # eval (held-out) | all (every record: for files that are test sets only)
    k: int = -1  # samples per problem at rollout.temperature (0: greedy only; -1: 4 on a GPU, 0 on the CPU)
    greedy: bool = True
    out: str = ""  # JSON output file ("" = score-eval-<task>.json)
    samples: bool = True  # per-sample texts in the JSON
    num_turns: int = 2  # attempts in the greedy pass (3: a third, reported against the second)

    def check(self):
        _one_of(self.split, ("eval", "all"), "evaluate.split")
        _need(self.num_turns >= 2, f"evaluate.num_turns must be >= 2; got {self.num_turns}")
        _need(self.k >= -1, f"evaluate.k must be >= 0 (or -1: by device); got {self.k}")
        if self.out:
            check_output_path(self.out, "evaluate.out")


@dataclass
class GenerateCommand:
    """score-generate's own settings (sampling is the rollout section)."""
    input: str = ""  # JSONL, one {"prompt": ...} per line
    output: str = ""
    two_turn: bool = False
    kind: str = "math"  # arithmetic | math | code: the default token budget and turn-2 instruction
    top_k: int = 0  # 0 = off
    stop: list[str] = field(default_factory=list)

    def check(self):
        _need(bool(self.input), "generate.input is required (--input prompts.jsonl)")
        _need(bool(self.output), "generate.output is required (--output out.jsonl)")
        _one_of(self.kind, tuple(TASK_DEFAULTS), "generate.kind")
        _need(self.top_k >= 0, f"generate.top_k must be >= 0 (0 = off); got {self.top_k}")
        check_output_path(self.output, "generate.output")


def check_output_path(path: str, key: str):
    d = os.path.dirname(os.path.abspath(path))
    _need(os.path.isdir(d), f"{key}: the directory {d} does not exist")
    _need(os.access(d, os.W_OK), f"{key}: the directory {d} is not writable")
    _need(not os.path.isdir(path), f"{key}: {path} is a directory")


# ---------------------------------------------------------------------------- the commands' configs

@dataclass
class Config:
    """score-train."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def validate(self) -> Config:
        self.algo.check()
        self.rollout.check()
        _need(self.algo.num_turns == 2 or self.rollout.engine == "engine",
              f"algo.num_turns={self.algo.num_turns} needs rollout.engine=engine (the HF baseline samples two turns)")
        if self.rollout.turn2_n > 1:
            _need(self.algo.name in MULTI_TURN_ALGOS and self.algo.num_turns == 2,
                  f"rollout.turn2_n={self.rollout.turn2_n} (turn-2 branches) applies to two-turn "
                  f"{' and '.join(MULTI_TURN_ALGOS)}; got algo.name={self.algo.name}, algo.num_turns={self.algo.num_turns}")
            _need(self.rollout.engine == "engine",
                  f"rollout.turn2_n={self.rollout.turn2_n} needs rollout.engine=engine (forks over the paged KV cache)")
        self.model.check(training=True)
        self.optim.check()
        self.data.check()
        self.eval.check()
        self.run.check()
        self.dist.check()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_ROLLOUT_DTYPE_TRAINING = ("rollout.dtype is a training setting (bf16 copies for the trainer's rollouts); evaluate or "
                           "generate in bf16 with --model.dtype=bfloat16")
_TURN2_N_TRAINING = "rollout.turn2_n is a training setting (turn-2 branches of the trainer's rollouts)"


@dataclass
class EvalCommandConfig:
    """score-eval."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    run: RunConfig = field(default_factory=RunConfig)
    evaluate: EvalCommand = field(default_factory=EvalCommand)

    def validate(self) -> EvalCommandConfig:
        self.model.check(training=False)
        self.data.check()
        self.rollout.check()
        _need(self.rollout.dtype == "model", _ROLLOUT_DTYPE_TRAINING)
        _need(self.rollout.turn2_n == 1, _TURN2_N_TRAINING)
        self.run.check()
        self.evaluate.check()
        _need(self.evaluate.num_turns == 2 or self.rollout.engine == "engine",
              f"evaluate.num_turns={self.evaluate.num_turns} needs rollout.engine=engine")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class GenerateCommandConfig:
    """score-generate."""
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    run: RunConfig = field(default_factory=RunConfig)
    generate: GenerateCommand = field(default_factory=GenerateCommand)

    def validate(self) -> GenerateCommandConfig:
        self.model.check(training=False)
        self.rollout.check()
        _need(self.rollout.dtype == "model", _ROLLOUT_DTYPE_TRAINING)
        _need(self.rollout.turn2_n == 1, _TURN2_N_TRAINING)
        self.run.check()
        self.generate.check()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def task_kind(task: str, records=None) -> str:
    """The kind of a task's records (arithmetic | math | code): fixed by the task's name, or (jsonl:) by
    its records."""
    if task in TASK_KINDS:
        return TASK_KINDS[task]
    if not records:
        raise UsageError(f"data.task={task!r}: the kind of its records is known once they are read")
    return records[0].kind


def resolve(cfg, kind: str):
    """A copy of cfg with every 0 ("the task's default") budget filled in for records of `kind`."""
    cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout))
    if not cfg.rollout.max_new_tokens:
        cfg.rollout.max_new_tokens = TASK_DEFAULTS[kind]["max_new_tokens"]
    if isinstance(cfg, Config):
        cfg.eval = dataclasses.replace(cfg.eval)
        if not cfg.eval.max_new_tokens:
            cfg.eval.max_new_tokens = cfg.rollout.max_new_tokens
    return cfg


# ---------------------------------------------------------------------------- YAML and overrides

def _coerce(value, tp, key: str):
    """Check / convert a YAML value to the field's declared type."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UsageError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise UsageError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-6" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        return value if isinstance(value, str) else str(value)
    raise TypeError(f"{key}: unsupported field type {tp}")


def _renamed(data: dict, prefix: str) -> dict:
    out = dict(data)
    for old, new in RENAMED.items():
        sec, o = old.rsplit(".", 1)
        n = new.rsplit(".", 1)[1]
        if prefix == sec + "." and o in out:
            if n in out:
                raise UsageError(f"{old} and {new} are both given: {old} is the old name of {new}; keep {new}")
            print(f"score: config key {old} is now {new} (Adam's coefficient; algo.beta1/beta2 are the KL "
                  f"coefficients); read as {new}", file=sys.stderr)
            out[n] = out.pop(o)
    return out


def _apply(obj, data: dict, prefix: str = "", *, skip: frozenset = frozenset()):
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in _renamed(data, prefix).items():
        key = f"{prefix}{k}"
        if k not in names:
            if not prefix and k in skip:  # another command's section, in a shared YAML file
                continue
            raise UsageError(f"unknown config key {key!r} (known: {', '.join(sorted(prefix + n for n in names))})")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise UsageError(f"{key}: expected a mapping")
            _apply(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def _nested(key: str, value) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def _scalar(raw: str):
    if raw == "":
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def read_yaml(path: str, what: str = "--config") -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"{what}: no such file: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise UsageError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: the top level must be a mapping")
    return data


def preset_path(name: str) -> str:
    """score_train/configs/<name>.yaml, the package's own copy (works from an installed wheel)."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return str(resources.files("score_train") / "configs" / f"{name}.yaml")


_OTHER_SECTIONS = frozenset(f.name for f in dataclasses.fields(Config))


def build(cls, file_data: dict | None = None, overrides: list[tuple[str, object]] = (), base=None):
    """cls() (or a copy of `base`) with the YAML mapping and then each (dotted key, value) applied, in order."""
    cfg = cls() if base is None else _copy(base)
    if file_data:
        _apply(cfg, file_data, skip=_OTHER_SECTIONS)
    for key, value in overrides:
        _apply(cfg, _nested(key, value))
    return cfg


def _copy(cfg):
    return _from_dict(type(cfg), dataclasses.asdict(cfg))


def _from_dict(cls, data: dict):
    cfg = cls()
    _apply(cfg, data)
    return cfg


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """score-train's config from a YAML file and `--section.key=value` strings (the Python API)."""
    pairs = []
    for item in overrides or []:
        if not item.startswith("--") or "=" not in item:
            raise UsageError(f"override {item!r} must look like --section.key=value")
        key, raw = item[2:].split("=", 1)
        pairs.append((key, raw if _field_type(Config, key) is str else _scalar(raw)))
    return build(Config, read_yaml(path) if path else None, pairs).validate()


def dump_config(cfg) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def flat(cfg) -> dict:
    """{"section.key": value} of a config."""
    return {f"{s}.{k}": v for s, sec in cfg.to_dict().items() for k, v in sec.items()}


def merge_resume(saved: Config, given: Config, where: str) -> tuple[Config, list[str]]:
    """The config a resumed run continues with: the run's own saved config, with the `given` values only
    where they are safe (RESUME_SAFE). Returns (config, ["key: old -> new", ...]); any other difference
    is refused, since it would change what the run computes."""
    a, b = flat(saved), flat(given)
    changed = [k for k in b if k not in RUN_IDENTITY and a.get(k) != b[k]]
    bad = [k for k in changed if k not in RESUME_SAFE]
    if bad:
        diffs = ", ".join(f"{k} ({a.get(k)!r} -> {b[k]!r})" for k in bad)
        raise UsageError(f"cannot resume {where} with {diffs}: a resumed run keeps its own config.yaml; only "
                         f"{', '.join(sorted(RESUME_SAFE - {'run.resume'}))} may change. Start a new run "
                         "(another --run.name) to change the others")
    merged = _copy(saved)
    for k in changed:
        _apply(merged, _nested(k, b[k]))
    merged.run.resume = True
    return merged.validate(), [f"{k}: {a.get(k)!r} -> {b[k]!r}" for k in changed if k != "run.resume"]


# ---------------------------------------------------------------------------- the command line

@dataclass
class Alias:
    """A short flag of a command: `--model X` sets model.spec (keys: every key it sets)."""
    keys: tuple[str, ...]
    const: object = None  # set: the flag takes no value (--two-turn)
    convert: Callable | None = None  # the raw string -> the value
    append: bool = False  # repeatable; each occurrence adds to a list (--stop A --stop B)
    help: str = ""


@dataclass
class Parsed:
    cfg: object
    flags: dict  # help, debug
    file_data: dict | None  # the YAML given with --config / --preset (None: none given)
    overrides: list[tuple[str, object]]  # (dotted key, value), in command-line order


def _field_type(cls, key: str):
    tp = cls
    try:
        for part in key.split("."):
            tp = typing.get_type_hints(tp)[part]
    except (KeyError, TypeError):
        return None
    return tp


def parse_command(argv, cls, aliases: dict[str, Alias] | None = None, *, default_preset: str | None = None,
                  validate: bool = True) -> Parsed:
    """Parse `[--config FILE | --preset NAME] [--section.key=value | --section.key value | --alias ...]
    [--debug] [--help]` into a `cls` config. Every command parses this way."""
    aliases = aliases or {}
    argv = list(argv or [])
    path = preset = None
    flags: dict = {}
    overrides: list[tuple[str, object]] = []
    appended: dict[str, list] = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        i += 1
        if a in ("-h", "--help"):
            flags["help"] = True
            continue
        if a == "--debug":
            flags["debug"] = True
            continue
        if not a.startswith("--"):
            raise UsageError(f"unexpected argument {a!r} (settings look like --section.key=value)")
        name, eq, raw = a[2:].partition("=")

        def value(name=name, eq=eq, raw=raw):
            nonlocal i
            if eq:
                return raw
            if i >= len(argv) or argv[i].startswith("--"):
                raise UsageError(f"--{name} needs a value")
            i += 1
            return argv[i - 1]

        if name in ("config", "preset"):
            v = value()
            if name == "config":
                path = v
            else:
                preset = v
        elif name in aliases:
            al = aliases[name]
            if al.const is not None:
                if eq:
                    raise UsageError(f"--{name} takes no value")
                v = al.const
            else:
                v = value()
                v = al.convert(v) if al.convert else _scalar(v)
            for key in al.keys:
                if al.append:
                    appended.setdefault(key, []).append(v)
                    overrides = [o for o in overrides if o[0] != key] + [(key, list(appended[key]))]
                else:
                    overrides.append((key, v))
        else:
            tp = _field_type(cls, name)
            if tp is None and "." not in name:
                known = ", ".join(sorted(aliases))
                raise UsageError(f"unknown option --{name}" + (f" (short options: {known})" if known else "")
                                 + "; settings look like --section.key=value")
            if tp is bool and not eq:
                v = True
            else:  # a text setting is taken as written ("Let me see: x" is not a YAML mapping)
                v = value() if tp is str else _scalar(value())
            overrides.append((name, v))
    if path and preset:
        raise UsageError("give --config or --preset, not both")
    if path and not os.path.exists(path) and path in PRESETS:
        preset, path = path, None
    explicit = path is not None or preset is not None
    if path is None and (preset or default_preset):
        path = preset_path(preset or default_preset)
    if flags.get("help"):
        return Parsed(None, flags, None, overrides)
    file_data = read_yaml(path) if path else None
    cfg = build(cls, file_data, overrides)
    if validate:
        cfg.validate()
    return Parsed(cfg, flags, file_data if explicit else None, overrides)


def parse_args(argv: list[str] | None) -> tuple[Config, dict]:
    """score-train's command line: [--config FILE | --preset NAME] [--resume] [--section.key=value ...].
    No file and no preset = demo. The returned config remembers which keys the command line gave
    (`cfg.cli_keys`: the overrides and an explicit --config / --preset file's keys): a resumed run takes
    only those over its own saved config.yaml (see `rundir.open_run`), never the preset's defaults."""
    p = parse_command(argv, Config, TRAIN_ALIASES, default_preset="demo", validate=False)
    if p.flags.get("help"):
        return Config(), p.flags
    cfg = p.cfg.validate()
    keys = {k for k, _ in p.overrides}
    if p.file_data:
        keys |= {f"{s}.{k}" for s, sec in p.file_data.items() if isinstance(sec, dict) for k in sec}
    cfg.cli_keys = frozenset(RENAMED.get(k, k) for k in keys)
    saved = os.path.join(cfg.run.out_dir, cfg.run.name, "config.yaml")
    if cfg.run.resume and os.path.isfile(saved):  # (a missing run is reported by rundir.open_run)
        keys = cfg.cli_keys
        cfg = resume_request(cfg, load_saved_config(os.path.dirname(saved))).validate()
        cfg.cli_keys = keys
    return cfg, p.flags


def resume_request(cfg: Config, saved: Config) -> Config:
    """What a resume asks for: `saved` with the keys the command line gave (all of cfg when it did not come
    from the command line, e.g. `train(cfg)` from Python)."""
    keys = getattr(cfg, "cli_keys", None)
    if keys is None:
        return cfg
    values = flat(cfg)
    return build(Config, None, [(k, values[k]) for k in sorted(keys) if k in values], base=saved)


def load_saved_config(run_dir: str) -> Config:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise UsageError(f"nothing to resume: {path} does not exist (check --run.name / --run.out_dir, or drop "
                         "--resume to start the run)")
    return build(Config, read_yaml(path, "the run's config.yaml"))


TRAIN_ALIASES = {"resume": Alias(("run.resume",), const=True, help="continue the run's last complete checkpoint")}


def usage(prog: str, cls, aliases: dict[str, Alias], head: str) -> str:
    """The help text: the command's own lines, its short options, and every section's keys with defaults."""
    lines = [head.rstrip(), ""]
    if aliases:
        lines.append("short options:")
        for name, al in aliases.items():
            arg = "" if al.const is not None else " X"
            val = "" if al.const is None else "=" + str(al.const).lower()
            keys = ", ".join(f"--{k}{val}" for k in al.keys)
            lines.append(f"  --{name}{arg}".ljust(24) + f"= {keys}" + (f"  {al.help}" if al.help else ""))
        lines.append("")
    lines.append("settings (--section.key=value; defaults shown; docs/trainer.md#configuration):")
    for f in dataclasses.fields(cls):
        sec = getattr(cls(), f.name)
        items = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(sec).items())
        lines.append(f"  {f.name}: {items}")
    lines.append("  --debug: show the traceback of an error")
    return "\n".join(lines)
