"""Atomic, resumable checkpoints.

    <run>/checkpoints/step_000012/
        model.safetensors   trainable parameters (the frozen ones are re-created from model.spec)
        optimizer.pt        optimizer state
        state.json          step, stage, data position, best reward, metrics so far, wall_s (all segments)
        rng.pt              torch / python / numpy RNG states
        COMPLETE            written last

Everything is written into `step_000012.tmp-<pid>/` first and the directory is renamed when complete,
so a kill in the middle of a save leaves a `.tmp-*` directory that `latest()` ignores (and the next
save removes). A directory only counts with its COMPLETE marker.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil

import torch

_NAME = re.compile(r"^step_(\d{6,})$")


def _fsync_dir(path: str):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    out = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        out["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save(ckpt_dir: str, step: int, model: torch.nn.Module, optimizer, state: dict, *, keep: int = 2,
         fault_hook=None) -> str:
    """Write checkpoint `step` atomically; keep the newest `keep` complete ones. Returns its path.
    fault_hook(stage_name) is called between files (tests use it to simulate a crash)."""
    from safetensors.torch import save_file

    os.makedirs(ckpt_dir, exist_ok=True)
    for d in os.listdir(ckpt_dir):  # leftovers of a crash mid-save
        if ".tmp-" in d:
            shutil.rmtree(os.path.join(ckpt_dir, d), ignore_errors=True)
    final = os.path.join(ckpt_dir, f"step_{step:06d}")
    tmp = f"{final}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    hook = fault_hook or (lambda _name: None)
    save_file(trainable_state(model), os.path.join(tmp, "model.safetensors"))
    hook("model")
    torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    hook("optimizer")
    torch.save(rng_state(), os.path.join(tmp, "rng.pt"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(dict(state, step=step), f, indent=1)
    hook("state")
    with open(os.path.join(tmp, "COMPLETE"), "w") as f:
        f.write("ok\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if os.path.exists(final):  # re-saving the same step (e.g. after resume)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_dir)
    for old in complete_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(ckpt_dir: str) -> list[str]:
    """Complete checkpoint directories, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    out = []
    for d in os.listdir(ckpt_dir):
        m = _NAME.match(d)
        p = os.path.join(ckpt_dir, d)
        if m and os.path.exists(os.path.join(p, "COMPLETE")):
            out.append((int(m.group(1)), p))
    return [p for _, p in sorted(out)]


def step_of(path: str) -> int:
    """The step of a checkpoint directory, from its name."""
    m = _NAME.match(os.path.basename(os.path.normpath(path)))
    if not m:
        raise ValueError(f"{path} is not a checkpoint directory (step_NNNNNN)")
    return int(m.group(1))


def latest(ckpt_dir: str) -> str | None:
    c = complete_checkpoints(ckpt_dir)
    return c[-1] if c else None


def load(path: str, model: torch.nn.Module, optimizer=None, *, restore_rng: bool = True) -> dict:
    """Load a checkpoint into model (trainable parameters) and optimizer; returns state.json."""
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(path, "model.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    if missing:
        raise ValueError(f"checkpoint {path} lacks trainable parameters {missing[:4]} (was it made "
                         "with another model, model.train_layers or model.lora_rank?)")
    with torch.no_grad():
        for n, t in tensors.items():
            if n not in params:
                raise ValueError(f"checkpoint {path} has unknown parameter {n!r}")
            params[n].copy_(t)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=False))
    if restore_rng:
        set_rng_state(torch.load(os.path.join(path, "rng.pt"), weights_only=False))
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)
