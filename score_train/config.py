"""The typed configuration of `score-train`, `score-eval` and `score-generate`: one schema, each default defined once.

Nested dataclasses, one a section; every field's help is its `metadata["help"]`, which `--help` prints (TRL's
convention). Each section checks its own values (`check`), and each command's config checks the whole
(`validate`), so a typo, a wrong type or an impossible value fails before anything is loaded, as a `UsageError`.
Loading, merging and resuming are `score_train.config_io`; the command lines are `score_train.commands`.

Token budgets: `rollout.max_new_tokens: 0` means the task's default from `TASK_DEFAULTS`; `resolve` fills it in
once the task's kind is known, so the saved config holds the number that was used.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import ClassVar

from score_train.data.arithmetic import DEFAULT_FORMAT as ARITHMETIC_FORMAT
from score_train.data.arithmetic import OPS
from score_train.data.arithmetic import format_fields as arithmetic_format_fields

ALGOS = ("score", "multi-turn-rl", "single-turn-rl", "star", "pair-sft", "self-refine")
MULTI_TURN_ALGOS = ("score", "multi-turn-rl")  # the algorithms that train more than two turns (algo.num_turns)
PRESETS = ("demo", "math", "code")
TASKS = ("arithmetic", "champ", "humaneval", "jsonl:PATH")

# Per-task defaults, by the kind of the task's records. max_new_tokens is per turn, chosen so that the base model's
# turn-1 answers end by themselves (experiments/self-correction/REPORT.md, "The 32-token artefact").
TASK_DEFAULTS: dict[str, dict] = {
    "arithmetic": {"max_new_tokens": 128},
    "math": {"max_new_tokens": 512},
    "code": {"max_new_tokens": 512},
}
TASK_KINDS = {"arithmetic": "arithmetic", "champ": "math", "humaneval": "code"}  # jsonl: read from the file


class UsageError(ValueError):
    """A problem with the command line, the config or an input file, found before any work is done."""


def _need(ok: bool, msg: str):
    if not ok:
        raise UsageError(msg)


def _one_of(value, allowed, key: str):
    _need(value in allowed, f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def setting(default, help: str, sep: str = ",", **kw):  # noqa: A002 - TRL's name for it
    """A field with its default and the help text `--help` prints. sep: how a list field's items are separated in
    one command-line value (a pool of sentences, which hold commas, uses "|")."""
    if isinstance(default, list):
        return field(default_factory=lambda d=tuple(default): list(d), metadata={"help": help, "sep": sep}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def help_of(cls, name: str) -> str:
    return next(f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name)


# ---------------------------------------------------------------------------- sections

@dataclass
class ModelConfig:
    """The policy: which model, its dtype, and what trains."""
    spec: str = setting("embedded", "local HF directory, .gguf file, or 'embedded' (SmolLM2-135M-Instruct)")
    dtype: str = setting("float32", "parameter dtype: float32 | bfloat16 (float16: score-eval / score-generate only)")
    autocast_bf16: bool = setting(False, "bf16 autocast for the training forward (CPU or GPU)")
    train_layers: int = setting(0, "0 = all; k > 0 trains only the top k decoder layers (+ final norm)")
    train_embeddings: bool = setting(True, "train the (often tied) embedding / lm_head matrix (never with LoRA)")
    lora_rank: int = setting(0, "> 0: train peft LoRA adapters of this rank on every linear projection of the trained "
                                "layers instead of their weights; the KL reference is the model with its adapters off; "
                                "the export merges them (final_model) and writes the adapter (final_adapter)")
    lora_alpha: float = setting(32.0, "LoRA scale = lora_alpha / lora_rank")

    def check(self, *, training: bool):
        _need(bool(self.spec), "model.spec is empty: give a local HF directory, a .gguf file or 'embedded'")
        _one_of(self.dtype, ("float32", "bfloat16") if training else ("float32", "bfloat16", "float16"),
                "model.dtype")
        _need(self.train_layers >= 0, f"model.train_layers must be >= 0 (0 = all); got {self.train_layers}")
        _need(self.lora_rank >= 0, f"model.lora_rank must be >= 0 (0 = no LoRA); got {self.lora_rank}")
        _need(self.lora_alpha > 0, f"model.lora_alpha must be > 0; got {self.lora_alpha}")
        _need(training or self.lora_rank == 0, "model.lora_rank is a training setting: evaluate or generate with "
              "the run's merged final_model")


@dataclass
class DataConfig:
    """The task and how many of its problems each split gives."""
    task: str = setting("arithmetic", "arithmetic | champ | humaneval | jsonl:PATH")
    train_size: int = setting(2048, "problems drawn for training (the stream cycles over them)")
    eval_size: int = setting(256, "problems for every evaluation (a number >= the split's size: all of it)")
    seed: int = setting(0, "the problems drawn")
    dev_fraction: float = setting(0.0, "> 0: a dev split of this share of the task's problems, carved from the train "
                                       "side (no training run draws it): choose settings with eval.split=dev, report "
                                       "on eval at the same dev_fraction (it changes the train split)")
    digits: int = setting(2, "arithmetic: digits of each operand")
    n_operands: int = setting(2, "arithmetic: operands per problem")
    operand_digits: list[int] = setting([], "arithmetic: digits of each operand in order, e.g. 2,1 for '37 + 5' "
                                            "(overrides digits; empty = digits for every operand)")
    ops: list[str] = setting(["+"], "arithmetic: operations, e.g. +,- (comma-separated)")
    prompt_format: str = setting(ARITHMETIC_FORMAT, "arithmetic: the problem text; '{expr}' becomes e.g. '37 + 45', "
                                                    "or name the operands: 'What is the sum of {a} and {b}?'")

    def check(self):
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
        _need(not self.operand_digits or (len(self.operand_digits) == self.n_operands
                                          and min(self.operand_digits) >= 1),
              f"data.operand_digits must give data.n_operands={self.n_operands} digit counts, each >= 1 "
              f"(e.g. --data.operand_digits=2,1); got {self.operand_digits}")
        why = arithmetic_format_fields(self.prompt_format, self.n_operands)
        _need(why is None, f"data.{why}")
        _need(0 <= self.dev_fraction <= 0.5, f"data.dev_fraction must be in [0, 0.5]; got {self.dev_fraction}")

    def check_split(self, split: str, key: str):
        _need(split != "dev" or self.dev_fraction > 0, f"{key}=dev needs a dev split: set data.dev_fraction "
              "(e.g. 0.1; the train split then leaves those problems out)")


@dataclass
class AlgoConfig:
    """The algorithm, SCoRe's stage schedule and the loss."""
    name: str = setting("score", "score | multi-turn-rl | single-turn-rl | star | pair-sft | self-refine")
    stage1_steps: int = setting(10, "score: Stage I steps (policy gradient on turn 2, beta2 KL on turn 1)")
    stage2_steps: int = setting(10, "score: Stage II steps (both turns, shaping bonus on turn 2)")
    steps: int = setting(20, "the step count of every algorithm but score")
    interleave: int = setting(1, "score: repeat (Stage I, Stage II) this many times, splitting each stage's steps")
    estimator: str = setting("rloo", "advantage baseline: rloo | grpo | reinforce | none")
    std_normalize: bool = setting(False, "divide each group's advantages by their standard deviation")
    alpha: float = setting(10.0, "Stage II shaping bonus alpha * (r2 - r1) on turn 2")
    change_bonus: float = setting(0.0, "a named variant of turn 2's reward (score, multi-turn-rl; two turns): + this "
                                       "when turn 2 states another answer than a wrong turn 1 did, in every stage "
                                       "that trains turn 2, added after the shaping; a change after a right turn 1, "
                                       "or to no answer, earns nothing. 0 = the paper's reward")
    beta1: float = setting(0.01, "KL coefficient on every trained turn (the paper's beta_1)")
    beta2: float = setting(0.1, "Stage I KL coefficient on turn 1 (the paper's beta_2)")
    kl: str = setting("k3", "k1 | k2 | k3 (sampled, from reference log-probs) | exact (full-vocabulary linear_kl)")
    clip_eps: float = setting(0.0, "> 0 turns on PPO clipping (useful with optim.epochs > 1)")
    agg: str = setting("token-mean", "loss aggregation: token-mean | seq-mean-token-sum | seq-mean-token-mean")
    star_keep_correct: bool = setting(False, "star: also keep correct->correct traces (else only i->c)")
    num_turns: int = setting(2, "attempts per episode: 3 adds a third (score, multi-turn-rl; the paged engine)")

    def check(self):
        if self.name not in ALGOS:  # message kept: "algo.name must be one of"
            raise UsageError(f"algo.name must be one of {ALGOS}, got {self.name!r}")
        _one_of(self.kl, ("k1", "k2", "k3", "exact"), "algo.kl")
        _one_of(self.estimator, ("rloo", "grpo", "reinforce", "none"), "algo.estimator")
        _one_of(self.agg, ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"), "algo.agg")
        for k in ("stage1_steps", "stage2_steps", "steps"):
            _need(getattr(self, k) >= 0, f"algo.{k} must be >= 0; got {getattr(self, k)}")
        _need(self.interleave >= 1, f"algo.interleave must be >= 1; got {self.interleave}")
        for k in ("beta1", "beta2", "clip_eps", "change_bonus"):
            _need(getattr(self, k) >= 0, f"algo.{k} must be >= 0; got {getattr(self, k)}")
        _need(self.change_bonus == 0 or (self.name in MULTI_TURN_ALGOS and self.num_turns == 2),
              f"algo.change_bonus applies to two-turn {' and '.join(MULTI_TURN_ALGOS)}; got algo.name={self.name}, "
              f"algo.num_turns={self.num_turns}")
        _need(self.num_turns >= 2, f"algo.num_turns must be >= 2 (the first attempt and at least one correction); "
                                   f"got {self.num_turns}")
        _need(self.num_turns == 2 or self.name in (*MULTI_TURN_ALGOS, "self-refine"),
              f"algo.num_turns={self.num_turns} applies to {', '.join(MULTI_TURN_ALGOS)} and self-refine; "
              f"{self.name} trains two turns")


_DTYPE_TRAINING = ("rollout.dtype is a training setting (bf16 copies for the trainer's rollouts); evaluate or "
                   "generate in bf16 with --model.dtype=bfloat16")


@dataclass
class SamplingConfig:
    """How every command samples: the `rollout` section of score-eval and score-generate, and the sampling part of
    score-train's (`RolloutConfig`)."""
    engine: str = setting("engine", "engine (paged, prefix-shared) | hf (transformers generate)")
    n: int = setting(4, "samples per prompt")
    temperature: float = setting(1.0, "sampling temperature (0 = greedy); training scores log-probs at it")
    top_p: float = setting(1.0, "nucleus sampling (1 = off)")
    max_new_tokens: int = setting(0, "tokens per turn; 0 = the task's default (TASK_DEFAULTS)")
    style: str = setting("plain", "prompts: plain | paper (the paper's math prompts for arithmetic)")
    instruction: str = setting("", "the message after each turn but the last; '' = the task's own")
    reply_prefix: str = setting("", "fixed text every reply after the instruction starts with (context, never "
                                    "trained; the turn's text and answer are what follows it); '' = none")

    # score-train's settings that score-eval and score-generate refuse, with the reason
    TRAINING_ONLY: ClassVar[dict[str, str]] = {
        "dtype": _DTYPE_TRAINING,
        "turn2_n": "rollout.turn2_n is a training setting (turn-2 branches of the trainer's rollouts)",
        "instruction_pool": "rollout.instruction_pool is a training setting (evaluate one text with --instruction)",
        "reply_prefix_pool": "rollout.reply_prefix_pool is a training setting (evaluate one with --reply-prefix)",
        "prompts_per_step": "rollout.prompts_per_step is a training setting",
        "reuse_prefix": "rollout.reuse_prefix is a training setting",
    }

    def check(self):
        _one_of(self.engine, ("engine", "hf"), "rollout.engine")
        _one_of(self.style, ("plain", "paper"), "rollout.style")
        _need(self.n >= 1, "rollout.n must be >= 1")
        _need(self.max_new_tokens >= 0, f"rollout.max_new_tokens must be >= 0 (0 = the task's default); "
                                        f"got {self.max_new_tokens}")
        _need(self.temperature >= 0, f"rollout.temperature must be >= 0; got {self.temperature}")
        _need(0 < self.top_p <= 1, f"rollout.top_p must be in (0, 1]; got {self.top_p}")


@dataclass
class RolloutConfig(SamplingConfig):
    """score-train's rollouts: the sampling settings, and those only training has."""
    prompts_per_step: int = setting(8, "prompts per training step (each sampled rollout.n times)")
    reuse_prefix: bool = setting(True, "the engine keeps each sample's residual after the frozen bottom layers "
                                       "(model.train_layers), so the update skips them")
    dtype: str = setting("model", "model (sample in the policy's dtype) | bfloat16 (a bf16 copy of the weights, "
                                  "cast once a step; the update and every evaluation stay in the model's dtype)")
    turn2_n: int = setting(1, "turn-2 samples per turn 1 (score, multi-turn-rl; the paged engine): each turn 1 forks "
                              "into m branches over its cached KV, turn 2's baseline is then its siblings")
    instruction_pool: list[str] = setting([], "more turn-2 instructions, '|'-separated: each prompt's episodes of a "
                                              "step draw one of [rollout.instruction, *pool] (a lever for turn 2 "
                                              "to correct under instructions it never trained on); evaluation and "
                                              "the export keep rollout.instruction", sep="|")
    reply_prefix_pool: list[str] = setting([], "more reply openings, '|'-separated, drawn per prompt like the "
                                               "instruction pool (independently of it) from [rollout.reply_prefix, "
                                               "*pool]; write 'none' for the empty opening", sep="|")

    def check(self):
        super().check()
        _one_of(self.dtype, ("model", "bfloat16"), "rollout.dtype")
        _need(self.dtype == "model" or self.engine == "engine",
              f"rollout.dtype={self.dtype} needs rollout.engine=engine (the HF baseline samples the model as it is)")
        for k in ("prompts_per_step", "turn2_n"):
            _need(getattr(self, k) >= 1, f"rollout.{k} must be >= 1")
        for k in ("instruction_pool", "reply_prefix_pool"):
            _need(len(set(getattr(self, k))) == len(getattr(self, k)), f"rollout.{k} repeats an entry (each "
                  f"entry is drawn with equal odds; repeat none): {getattr(self, k)}")


@dataclass
class OptimConfig:
    """AdamW and the update."""
    lr: float = setting(1e-5, "learning rate")
    weight_decay: float = setting(0.0, "AdamW's weight decay")
    adam_beta1: float = setting(0.9, "AdamW's beta1 (algo.beta1 / beta2 are KL coefficients)")
    adam_beta2: float = setting(0.95, "AdamW's beta2")
    adam_eps: float = setting(1e-8, "AdamW's eps (its first step is lr * g / (|g| + eps) per element)")
    grad_clip: float = setting(1.0, "gradient norm clip (0 = off)")
    epochs: int = setting(1, "optimisation passes over each step's rollouts")
    micro_batch_tokens: int = setting(4096, "packed tokens per forward/backward")
    warmup_steps: int = setting(0, "linear learning-rate warm-up")

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
    """The training run's own evaluations (greedy, on data.eval_size problems of eval.split)."""
    every: int = setting(0, "steps between evaluations (0 = only before and after)")
    max_new_tokens: int = setting(0, "tokens per turn; 0 = rollout.max_new_tokens")
    before: bool = setting(True, "evaluate the base model before the first step")
    sample_rows: int = setting(16, "rows of the (problem, y1, y2, rewards) sample tables")
    split: str = setting("eval", "the split the run's evaluations read: eval (the test split) | dev (for choosing "
                                 "settings; needs data.dev_fraction)")

    def check(self):
        for k in ("every", "max_new_tokens", "sample_rows"):
            _need(getattr(self, k) >= 0, f"eval.{k} must be >= 0; got {getattr(self, k)}")
        _one_of(self.split, ("eval", "dev"), "eval.split")


@dataclass
class RunConfig:
    """The run directory, seeds, device and reporting."""
    name: str = setting("demo", "the run directory's name (under run.out_dir)")
    out_dir: str = setting("runs", "where run directories go")
    seed: int = setting(0, "the sampling and initialisation seed")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    threads: int = setting(0, "torch CPU threads (0 = torch's default)")
    save_every: int = setting(0, "steps between checkpoints (0 = only at stage ends and the end)")
    keep_checkpoints: int = setting(2, "checkpoints kept (0 = all)")
    resume: bool = setting(False, "continue the run's last complete checkpoint")
    export: bool = setting(True, "write the final model as a plain HF directory (final_model)")
    tensorboard: bool = setting(False, "log to TensorBoard")
    wandb: bool = setting(False, "log to Weights & Biases")
    progress: bool = setting(True, "progress bars on stderr")

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
    shard_ref: bool = setting(True, "shard the frozen reference too (False: replicate it, for small models)")
    activation_checkpointing: bool = setting(False, "recompute activations in the backward")
    timeout_s: float = setting(1800.0, "collective timeout: a dead rank ends the job instead of hanging it")

    def check(self):
        _need(self.timeout_s > 0, f"dist.timeout_s must be > 0; got {self.timeout_s}")


@dataclass
class EvalCommand:
    """score-eval's own settings (the problems: data.eval_size of data.task's evaluate.split)."""
    split: str = setting("eval", "eval (the test split) | dev (for choosing settings; needs data.dev_fraction) | "
                                 "all (every record: for files that are test sets only)")
    k: int = setting(-1, "samples per problem at rollout.temperature (0: greedy only; -1: 4 on a GPU, 0 on the CPU)")
    greedy: bool = setting(True, "the greedy pass (the paper's headline numbers)")
    out: str = setting("", "JSON output file ('' = score-eval-<task>.json)")
    samples: bool = setting(True, "per-sample texts in the JSON")
    num_turns: int = setting(2, "attempts in the greedy pass (3: a third, reported against the second)")

    def check(self):
        _one_of(self.split, ("eval", "dev", "all"), "evaluate.split")
        _need(self.num_turns >= 2, f"evaluate.num_turns must be >= 2; got {self.num_turns}")
        _need(self.k >= -1, f"evaluate.k must be >= 0 (or -1: by device); got {self.k}")
        if self.out:
            check_output_path(self.out, "evaluate.out")


@dataclass
class GenerateCommand:
    """score-generate's own settings (sampling is the rollout section)."""
    input: str = setting("", "JSONL, one {\"prompt\": ...} per line")
    output: str = setting("", "JSONL output file")
    two_turn: bool = setting(False, "sample a second turn after the instruction")
    kind: str = setting("math", "arithmetic | math | code: the default token budget and turn-2 instruction")
    top_k: int = setting(0, "top-k sampling (0 = off)")
    stop: list[str] = setting([], "stop strings (repeat --stop)")

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

class _Command:
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Config(_Command):
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
              f"algo.num_turns={self.algo.num_turns} needs rollout.engine=engine (training keeps the HF baseline as "
              f"the two-turn reference)")
        if self.rollout.turn2_n > 1:
            _need(self.algo.name in MULTI_TURN_ALGOS and self.algo.num_turns == 2,
                  f"rollout.turn2_n={self.rollout.turn2_n} (turn-2 branches) applies to two-turn "
                  f"{' and '.join(MULTI_TURN_ALGOS)}; got algo.name={self.algo.name}, algo.num_turns={self.algo.num_turns}")
            _need(self.rollout.engine == "engine",
                  f"rollout.turn2_n={self.rollout.turn2_n} needs rollout.engine=engine (forks over the paged KV cache)")
        _need(self.algo.change_bonus == 0 or self.rollout.turn2_n == 1,
              "algo.change_bonus needs rollout.turn2_n=1 (turn-2 branches have their own baseline)")
        _need(self.algo.change_bonus == 0 or TASK_KINDS.get(self.data.task) != "code",  # jsonl: algos checks
              f"algo.change_bonus compares the turns' stated answers, which {self.data.task} (code) does not have")
        self.model.check(training=True)
        self.optim.check()
        self.data.check()
        self.eval.check()
        self.data.check_split(self.eval.split, "eval.split")
        self.run.check()
        self.dist.check()
        return self


@dataclass
class EvalCommandConfig(_Command):
    """score-eval."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: SamplingConfig = field(default_factory=SamplingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    evaluate: EvalCommand = field(default_factory=EvalCommand)

    def validate(self) -> EvalCommandConfig:
        self.model.check(training=False)
        self.data.check()
        self.rollout.check()
        self.run.check()
        self.evaluate.check()
        self.data.check_split(self.evaluate.split, "evaluate.split")
        _need(self.evaluate.num_turns == 2 or self.rollout.engine == "engine",
              f"evaluate.num_turns={self.evaluate.num_turns} needs rollout.engine=engine")
        return self


@dataclass
class GenerateCommandConfig(_Command):
    """score-generate."""
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: SamplingConfig = field(default_factory=SamplingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    generate: GenerateCommand = field(default_factory=GenerateCommand)

    def validate(self) -> GenerateCommandConfig:
        self.model.check(training=False)
        self.rollout.check()
        self.run.check()
        self.generate.check()
        return self


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
