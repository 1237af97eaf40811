"""Shared test helpers."""
import os

import torch

from score_kernels import backends

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def live_backends(device: str = "cpu") -> list[str]:
    """Backends that can run tensors on `device` in this process."""
    live = backends()
    out = ["torch"]
    if live["triton"] and (device == "cuda" or INTERPRET):
        out.append("triton")
    if device == "cpu" and live["cpu"]:
        out.append("cpu")
    if device == "cuda" and live["cuda"]:
        out.append("cuda")
    return out


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
