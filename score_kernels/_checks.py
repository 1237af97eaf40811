"""Input validation shared by the op launchers: every failure is a ValueError naming the argument."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(name: str, x, *, floating: bool | None = None, integer: bool = False, ndim=None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor (float32/float16/bfloat16/float64), got {x.dtype}")
    if integer and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor, got {x.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(x.shape)}")
    return x


def same_shape(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but {ref_name} has shape {tuple(ref.shape)}")


def same_device(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def temperature(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {value!r}")
    return float(value)


def linear_inputs(hidden, weight, bias, hname="hidden", wname="weight", bname="bias") -> None:
    """hidden [..., d], weight [V, d] with V > 0, bias [V] or None, all on one device."""
    tensor(hname, hidden, floating=True)
    tensor(wname, weight, floating=True, ndim=2)
    if hidden.dim() < 1:
        raise ValueError(f"{hname} must have at least 1 dim [..., d], got shape {tuple(hidden.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{wname} has shape {tuple(weight.shape)} but {hname}'s last dim is {hidden.shape[-1]}")
    if weight.shape[0] == 0:
        raise ValueError(f"{wname} must have at least one vocabulary row")
    same_device(wname, weight, hname, hidden)
    if bias is not None:
        tensor(bname, bias, floating=True, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{bname} has shape {tuple(bias.shape)} but {wname} has {weight.shape[0]} rows")
        same_device(bname, bias, hname, hidden)


def targets(t, lead_name: str, lead: torch.Tensor, V: int, ignore_index: int) -> torch.Tensor:
    """Integer targets shaped like lead[..., 0], in [0, V) or ignore_index; returns them flat as int64.
    The range check syncs with the device, so it is skipped under torch.compile."""
    tensor("targets", t, integer=True)
    if t.shape != lead.shape[:-1]:
        raise ValueError(f"targets has shape {tuple(t.shape)} but {lead_name} has leading shape "
                         f"{tuple(lead.shape[:-1])}")
    same_device("targets", t, lead_name, lead)
    flat = t.reshape(-1).long()
    if flat.numel() and not torch.compiler.is_compiling():
        bad = (flat != ignore_index) & ((flat < 0) | (flat >= V))
        if bool(bad.any()):
            raise ValueError(f"targets must be in [0, {V}) or equal ignore_index={ignore_index}; "
                             f"got {int(flat[bad][0])}")
    return flat


def should_validate(validate: bool | None, device: torch.device) -> bool:
    """Data-dependent checks read values on the host: free on the CPU, a sync on a GPU. None (the
    default) checks CPU tensors only; True forces the checks; never under torch.compile."""
    if torch.compiler.is_compiling():
        return False
    return device.type == "cpu" if validate is None else bool(validate)


def check_turn_ids(name: str, turn_ids: torch.Tensor, K: int, arg_for_k: str) -> None:
    """Data-dependent check (reads values: one host sync on a GPU)."""
    if turn_ids.numel() and int(turn_ids.max()) >= K:
        raise ValueError(f"{name} has a turn id {int(turn_ids.max())} >= K={K} (from {arg_for_k})")


def check_cu_seqlens(cu_seqlens: torch.Tensor, n: int) -> None:
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != n or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to N={n}, got {cu_seqlens.tolist()[:8]}...")


def row_index(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """Sequence index of each packed token (searchsorted: no host sync)."""
    pos = torch.arange(n, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), pos, right=True)
