"""Test set-up. Without a GPU, Triton kernels run under the CPU interpreter: the flag must be set
before triton/score_kernels are imported, because @triton.jit reads it at decoration time."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


def tol(dtype: torch.dtype) -> dict:
    """rtol/atol from the dtype's machine epsilon (outputs of our ops are float32 at least)."""
    eps = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    return {"rtol": 8 * eps, "atol": 8 * eps}
