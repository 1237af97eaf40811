"""Log-probs from hidden states or logits, forward+backward, vs the naive path a trainer would write:
`log_softmax(h @ W.T).gather(targets)` (and the full-vocabulary KL sum for linear_kl), with an
arbitrary upstream gradient. CPU: fp32; GPU: bf16 inputs, fp32 log-softmax."""
import importlib
import importlib.util

import pytest
import torch

import score_kernels
from benchmarks.conftest import VARIANTS
from benchmarks.memory_probe import device_for
from benchmarks.shapes import shape


def _op(name):
    fn = getattr(score_kernels, name, None)
    for mod in ("linear_logprobs", name, "logits_logprobs"):  # written but not exported yet
        if fn is None and importlib.util.find_spec(f"score_kernels.{mod}"):
            fn = getattr(importlib.import_module(f"score_kernels.{mod}"), name, None)
    if fn is None:
        pytest.skip(f"score_kernels.{name} has not landed yet")
    return fn


def _shape(machine, op):
    s = shape(machine, op if machine == "gpu" else op + "_small") if op == "linear_logprobs" else shape(machine, op)
    return s[-1] if isinstance(s, list) else s  # the gpu registry lists several; the gate takes the smallest


def _dtype(machine):
    return torch.bfloat16 if machine == "gpu" else torch.float32


def _hidden_case(machine, op, with_ref=False):
    s, dev, dt = _shape(machine, op), device_for(machine), _dtype(machine)
    g = torch.Generator(device=dev).manual_seed(0)  # inputs made where they live: GPU shapes are GBs

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * std).to(dt)

    h = randn(s["N"], s["d"], std=0.5).requires_grad_(True)
    w = randn(s["V"], s["d"], std=0.05).requires_grad_(True)
    t = torch.randint(0, s["V"], (s["N"],), generator=g, device=dev)
    up = torch.randn(s["N"], generator=g, device=dev)
    ref = None
    if with_ref:
        ref = (h.detach() + randn(s["N"], s["d"], std=0.1), w.detach() + randn(s["V"], s["d"], std=0.01))
    return s, h, w, t, up, ref, f"N={s['N']} d={s['d']} V={s['V']} {str(dt)[6:]}"


def case_linear_logprobs(machine: str) -> dict:
    op = _op("linear_logprobs")
    _, h, w, t, up, _, name = _hidden_case(machine, "linear_logprobs")

    def naive():
        lp = torch.log_softmax((h @ w.t()).float(), dim=-1).gather(-1, t[:, None]).squeeze(-1)
        return torch.autograd.grad(lp, (h, w), up)

    return {"shape": name, "ours": lambda: torch.autograd.grad(op(h, w, t), (h, w), up), "baseline": naive,
            "rounds": 3}


def case_linear_kl(machine: str) -> dict:
    op = _op("linear_kl")
    _, h, w, _, up, (rh, rw), name = _hidden_case(machine, "linear_kl", with_ref=True)

    def naive():
        lp = torch.log_softmax((h @ w.t()).float(), dim=-1)
        with torch.no_grad():
            lr = torch.log_softmax((rh @ rw.t()).float(), dim=-1)
        kl = (lp.exp() * (lp - lr)).sum(-1)
        return torch.autograd.grad(kl, (h, w), up)

    return {"shape": name, "ours": lambda: torch.autograd.grad(op(h, w, rh, rw), (h, w), up), "baseline": naive,
            "rounds": 3}


def case_logprobs_from_logits(machine: str) -> dict:
    op = _op("logprobs_from_logits")
    s, dev, dt = shape(machine, "logprobs_from_logits"), device_for(machine), _dtype(machine)
    g = torch.Generator(device=dev).manual_seed(0)
    z = (torch.randn(s["N"], s["V"], generator=g, device=dev) * 2).to(dt).requires_grad_(True)
    t = torch.randint(0, s["V"], (s["N"],), generator=g, device=dev)
    up = torch.randn(s["N"], generator=g, device=dev)

    def naive():
        lp = torch.log_softmax(z.float(), dim=-1).gather(-1, t[:, None]).squeeze(-1)
        return torch.autograd.grad(lp, z, up)

    return {"shape": f"N={s['N']} V={s['V']} {str(dt)[6:]}", "ours": lambda: torch.autograd.grad(op(z, t), z, up),
            "baseline": naive, "rounds": 5}


CASES = {"linear_logprobs": case_linear_logprobs, "logprobs_from_logits": case_logprobs_from_logits,
         "linear_kl": case_linear_kl}


@pytest.mark.parametrize("variant", VARIANTS)
def test_linear_logprobs(paired, variant):
    paired("linear_logprobs", variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_logprobs_from_logits(paired, variant):
    paired("logprobs_from_logits", variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_linear_kl(paired, variant):
    paired("linear_kl", variant)
