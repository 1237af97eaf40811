"""Checks of a command's inputs that run before any model is loaded.

A model path that is not there, a task file that is missing, empty or malformed, a device that is not
there: each is a `UsageError` with one line naming the setting (and the file and line), found in the
first second instead of after the ~15-25 s model load.
"""
from __future__ import annotations

import os

import torch

from score_train.config import DataConfig, UsageError
from score_train.data import ArithmeticConfig, load_task
from score_train.model import embedded_gguf_path


def check_model(spec: str, key: str = "model.spec"):
    """spec is "embedded", a .gguf file or a local Hugging Face directory (nothing is fetched from a hub)."""
    if spec == "embedded":
        try:
            embedded_gguf_path()
        except FileNotFoundError as e:
            raise UsageError(f"{key}=embedded: {e}") from None
        return
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise UsageError(f"{key}: no such file: {spec}")
        return
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise UsageError(f"{key}: {spec} has no config.json (not a Hugging Face model directory)")
        return
    raise UsageError(f"{key}: {spec} is not a local directory, a .gguf file, or 'embedded' "
                     "(nothing is fetched from a model hub)")


def check_device(device: str, key: str = "run.device"):
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise UsageError(f"{key}={device}: torch sees no CUDA device (use auto or cpu)")
    if ":" in device and int(device.split(":", 1)[1]) >= torch.cuda.device_count():
        raise UsageError(f"{key}={device}: there are {torch.cuda.device_count()} CUDA devices")


def load_records(data: DataConfig, split: str, n: int):
    """The task's records of one split, as the trainer and score-eval read them; a UsageError names the
    task and (for JSONL) the file and line of the first bad record."""
    arith = None
    if data.task == "arithmetic":
        arith = ArithmeticConfig(digits=data.digits, n_operands=data.n_operands, ops=tuple(data.ops),
                                 operand_digits=tuple(data.operand_digits),
                                 prompt_format=data.prompt_format, dev_fraction=data.dev_fraction)
    path = data.task[len("jsonl:"):] if data.task.startswith("jsonl:") else None
    if path is not None and not os.path.isfile(path):
        raise UsageError(f"data.task={data.task}: no such file: {path}")
    try:
        recs = load_task(data.task, split, n, data.seed, dev_fraction=data.dev_fraction, arithmetic=arith)
    except (OSError, ValueError, ImportError) as e:
        raise UsageError(f"data.task={data.task}: {e}") from None
    kinds = sorted({r.kind for r in recs})
    if len(kinds) > 1:
        raise UsageError(f"data.task={data.task}: records of several kinds ({', '.join(kinds)}); one task, one kind")
    return recs


def check_nonempty(recs, data: DataConfig, split: str):
    if not recs:
        raise UsageError(f"data.task={data.task}: the {split} split is empty (held-out problems are chosen by a "
                         "hash of each record; a file needs more records)")
