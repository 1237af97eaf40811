"""Which backends are live, and which one an op call runs on.

Backends: "triton" (GPU, or the CPU interpreter under TRITON_INTERPRET=1), "cuda" (the compiled
extension's CUDA kernels), "cpu" (the compiled extension's CPU kernels) and "torch" (pure PyTorch,
always live). Ops pass their own preference order; `backend=` forces one.
"""
from __future__ import annotations

import os
import warnings

import torch

BACKENDS = ("triton", "cuda", "cpu", "torch")

# Under the Triton CPU interpreter, bf16 tl.dot operands give wrong results (machine-facts.md),
# so kernels upcast dot operands to fp32 through a constexpr flag set from this.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load_ext():
    if os.environ.get("SCORE_NO_EXT", "0") == "1":
        return None
    try:
        from score_kernels import _C  # noqa: F401  (registers torch.ops.score_ext.*)
    except ImportError as e:
        # pip -q hides the build's own notice, so say it here, once, where the user sees it
        warnings.warn(f"score_kernels: the compiled extension is not available ({e}); ops use their Triton / "
                      "PyTorch paths (rebuild with a C++ compiler: pip install -e .)", stacklevel=2)
        return None
    return _C


def _load_triton() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


# Probed once at import (not lru_cache'd: plain globals keep torch.compile tracing quiet).
_EXT = _load_ext()
_TRITON = _load_triton()


def _ext():
    return _EXT


def _triton_importable() -> bool:
    return _TRITON


def has_triton() -> bool:
    return _triton_importable() and (INTERPRET or torch.cuda.is_available())


def has_cuda_ext() -> bool:
    ext = _ext()
    return ext is not None and bool(getattr(ext, "with_cuda", False)) and torch.cuda.is_available()


def has_cpu_ext() -> bool:
    return _ext() is not None


def backends() -> dict[str, bool]:
    """Which backends are live in this process."""
    return {"triton": has_triton(), "cuda": has_cuda_ext(), "cpu": has_cpu_ext(), "torch": True}


def _usable(name: str, device: torch.device, ext_ops: tuple[str, ...]) -> bool:
    if name == "torch":
        return True
    if name == "triton":
        return has_triton() and (device.type == "cuda" or (INTERPRET and device.type == "cpu"))
    ops_present = all(hasattr(torch.ops.score_ext, o) for o in ext_ops) if _ext() is not None else False
    if name == "cuda":
        return has_cuda_ext() and device.type == "cuda" and ops_present
    if name == "cpu":
        return has_cpu_ext() and device.type == "cpu" and ops_present
    return False


def pick_backend(
    backend: str | None,
    device: torch.device,
    *,
    supported: tuple[str, ...],
    ext_ops: tuple[str, ...] = (),
    op: str = "op",
) -> str:
    """Returns the backend to run on. `supported` is the op's preference order; a CPU tensor never
    defaults to the Triton interpreter (it is a test vehicle, not a fast path)."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
        if backend not in supported:
            raise ValueError(f"{op}: backend {backend!r} is not implemented for this op (has {supported})")
        if not _usable(backend, device, ext_ops):
            raise ValueError(f"{op}: backend {backend!r} is not live for device {device} (live: {backends()})")
        return backend
    for name in supported:
        if name == "triton" and device.type != "cuda":
            continue
        if _usable(name, device, ext_ops):
            return name
    return "torch"
