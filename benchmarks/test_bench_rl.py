"""Turn-level advantages and the fused policy-gradient + KL loss vs the chained-torch references in
their modules (score_kernels.advantages, score_kernels.policy_loss). SCoRe settings: K=2 turns, RLOO
with the Stage II bonus (alpha=10), per-turn KL (0.1, 0.01), PPO clip 0.2, token-mean."""
import importlib
import importlib.util

import pytest
import torch

import score_kernels
from benchmarks.conftest import VARIANTS
from benchmarks.memory_probe import device_for
from benchmarks.shapes import shape


def _need(module, *names):
    mod = score_kernels if all(hasattr(score_kernels, n) for n in names) else None
    if mod is None and importlib.util.find_spec(f"score_kernels.{module}"):  # written, not exported yet
        mod = importlib.import_module(f"score_kernels.{module}")
    if mod is None or not all(hasattr(mod, n) for n in names):
        pytest.skip(f"score_kernels.{names[0]} has not landed yet")
    return [getattr(mod, n) for n in names]


def _turn_ids(B, T, K, g, dev):
    """Prompt (-1), turn 0, instruction (-1), turn 1, padding (-1): the two-turn layout."""
    ids = torch.full((B, T), -1, dtype=torch.int64)
    for b in range(B):
        p, t0, ins, t1 = (int(x) for x in torch.randint(T // 16, T // 4, (4,), generator=g))
        ids[b, p:p + t0] = 0
        if K > 1:
            ids[b, p + t0 + ins:p + t0 + ins + t1] = 1
    return ids.to(dev)


def case_turn_advantages(machine: str) -> dict:
    ours, turn_advantages_reference = _need("advantages", "turn_advantages", "turn_advantages_reference")
    s, dev = shape(machine, "turn_advantages"), device_for(machine)
    g = torch.Generator().manual_seed(0)
    B, K = s["B"], s["K"]
    rewards = torch.randint(0, 2, (B, K), generator=g).float().to(dev)
    groups = (torch.randperm(B, generator=g) // s["group"]).to(dev)  # shuffled, not contiguous
    kw = {"estimator": "rloo", "shaping_alpha": 10.0}
    return {"shape": f"B={B} K={K} group={s['group']} rloo alpha=10",
            "ours": lambda: ours(rewards, groups, **kw),
            "baseline": lambda: turn_advantages_reference(rewards, groups, **kw), "rounds": 9, "iterations": 64}


def case_token_advantages(machine: str) -> dict:
    ours, token_advantages_reference = _need("advantages", "token_advantages", "token_advantages_reference")
    s, dev = shape(machine, "policy_loss"), device_for(machine)
    g = torch.Generator().manual_seed(0)
    B, T, K = s["B"], s["T"], s["K"]
    vals = torch.randn(B, K, generator=g).to(dev)
    ids = _turn_ids(B, T, K, g, dev)
    return {"shape": f"B={B} T={T} K={K}", "ours": lambda: ours(vals, ids),
            "baseline": lambda: token_advantages_reference(vals, ids), "rounds": 9, "iterations": 64}


def case_policy_loss(machine: str) -> dict:
    ours, policy_loss_reference = _need("policy_loss", "policy_loss", "policy_loss_reference")
    s, dev = shape(machine, "policy_loss"), device_for(machine)
    g = torch.Generator().manual_seed(0)
    B, T, K = s["B"], s["T"], s["K"]
    ids = _turn_ids(B, T, K, g, dev)
    lp = (-torch.rand(B, T, generator=g) * 3).to(dev).requires_grad_(True)
    old = (lp.detach() + 0.05 * torch.randn(B, T, generator=g).to(dev))
    ref = (lp.detach() + 0.1 * torch.randn(B, T, generator=g).to(dev))
    adv = torch.randn(B, K, generator=g).to(dev).gather(1, ids.clamp(min=0)) * (ids >= 0)
    kw = {"old_logprobs": old, "ref_logprobs": ref, "kl_coef": (0.1, 0.01), "kl_estimator": "k3",
          "clip_eps": 0.2, "agg": "token-mean"}

    def run(fn):
        loss, _ = fn(lp, adv, ids, **kw)
        return torch.autograd.grad(loss, lp)

    return {"shape": f"B={B} T={T} K={K} fwd+bwd", "ours": lambda: run(ours),
            "baseline": lambda: run(policy_loss_reference), "rounds": 9, "iterations": 8}


CASES = {"turn_advantages": case_turn_advantages, "token_advantages": case_token_advantages,
         "policy_loss": case_policy_loss}


@pytest.mark.parametrize("variant", VARIANTS)
def test_turn_advantages(paired, variant):
    paired("turn_advantages", variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_token_advantages(paired, variant):
    paired("token_advantages", variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_policy_loss(paired, variant):
    paired("policy_loss", variant)
