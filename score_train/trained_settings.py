"""The self-correction settings a trained model carries beside its weights (`final_model/score_settings.json`).

A model trained to correct itself under one turn-2 text corrects little under another, so the export writes the
settings it was trained with, and score-eval / score-generate use them by default for such a model (an explicit
flag still wins) and say that they did.
"""
from __future__ import annotations

import json
import os

FILE = "score_settings.json"
# the file's keys -> the config keys they set (score-eval: evaluate.num_turns; score-generate has no turn count)
KEYS = {"instruction": "rollout.instruction", "reply_prefix": "rollout.reply_prefix", "style": "rollout.style",
        "max_new_tokens": "rollout.max_new_tokens", "num_turns": "evaluate.num_turns"}


def write(model_dir: str, cfg) -> str:
    """Write the training config's self-correction settings into an exported model directory."""
    path = os.path.join(model_dir, FILE)
    settings = {"instruction": cfg.rollout.instruction, "reply_prefix": cfg.rollout.reply_prefix,
                "style": cfg.rollout.style, "max_new_tokens": cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                "num_turns": cfg.algo.num_turns, "task": cfg.data.task, "algo": cfg.algo.name}
    for k in ("instruction_pool", "reply_prefix_pool"):  # for the record: commands default to the fixed text
        if getattr(cfg.rollout, k):
            settings[k] = list(getattr(cfg.rollout, k))
    with open(path, "w") as f:
        json.dump(settings, f, indent=1)
    return path


def read(model_spec: str) -> dict | None:
    """The settings a model directory carries, or None (a hub model, a .gguf file, "embedded")."""
    path = os.path.join(model_spec, FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def defaults_for(model_spec: str, given: set[str], keys: dict[str, str] = KEYS) -> tuple[list[tuple[str, object]], str]:
    """The (config key, value) pairs a model's carried settings supply where the command line gave none, and a line
    that says so ("" when the model carries none or every key was given)."""
    s = read(model_spec)
    if s is None:
        return [], ""
    pairs = [(key, s[name]) for name, key in keys.items() if name in s and key not in given]
    if not pairs:
        return [], ""
    shown = ", ".join(f"{k}={v!r}" for k, v in pairs)
    return pairs, f"using the settings {model_spec} was trained with ({FILE}): {shown}; a flag overrides each"
