"""token_kl (k3) forward+backward vs its PyTorch reference."""
import pytest
import torch

from benchmarks.conftest import VARIANTS
from benchmarks.memory_probe import device_for
from benchmarks.shapes import shape
from score_kernels import token_kl, token_kl_reference


def case_token_kl(machine: str) -> dict:
    n, dev = shape(machine, "token_kl")["n"], device_for(machine)
    dt = torch.bfloat16 if machine == "gpu" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    lp = (torch.randn(n, device=dev, generator=g) * 0.1).to(dt).requires_grad_(True)
    ref = (torch.randn(n, device=dev, generator=g) * 0.1).to(dt)
    up = torch.ones(n, device=dev)
    return {
        "shape": f"N={n} {str(dt).removeprefix('torch.')}",
        "ours": lambda: torch.autograd.grad(token_kl(lp, ref, "k3"), lp, up),
        "baseline": lambda: torch.autograd.grad(token_kl_reference(lp, ref, "k3"), lp, up),
        "rounds": 9,
        "iterations": 8,
    }


CASES = {"token_kl": case_token_kl}


@pytest.mark.parametrize("variant", VARIANTS)
def test_token_kl(paired, variant):
    paired("token_kl", variant)
