"""Small Triton helpers shared by the kernels (importable without a GPU)."""
from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - triton missing (non-Linux)
    triton = None
    tl = None
    HAVE_TRITON = False


if HAVE_TRITON:

    @triton.jit
    def expm1(x):
        # exp(x) - 1 without cancellation near 0; libdevice's expm1 is not in the interpreter.
        x2 = x * x
        series = x + x2 * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0 + x * (1.0 / 720.0)))))
        return tl.where(tl.abs(x) < 0.1, series, tl.exp(x) - 1.0)
else:  # pragma: no cover
    expm1 = None
