"""GPU benchmark: policy_loss forward+backward (bandwidth-bound) and turn/token advantages.

policy_loss: B*T = 1M tokens, K = 2, bf16 log-probs (policy, old, ref), fp32 advantages, int64
turn ids, PPO clip + per-turn KL. `bytes_moved` is the minimum any implementation must move (read
every input once, write the bf16 gradient once: 20 B/token), so frac_peak = that / time / measured
copy bandwidth. Ours moves 24 B/token (dl is stored in the forward and scaled in backward).

advantages: turn_advantages (rloo + alpha=10 bonus) + token_advantages on B=1024 samples, T=1024.
Timed eagerly (includes the Python dispatch) and as a replayed CUDA graph, which also proves that
neither op synchronises with the host (capture fails on a sync).
"""
import statistics

import torch

from benchmarks.gpu_timing import bench, row
from benchmarks.shapes import shape
from score_kernels import policy_loss, policy_loss_reference, token_advantages, turn_advantages


def _pg_inputs(B, T):
    lp = (-torch.rand(B, T, device="cuda") * 3).to(torch.bfloat16)
    old = (lp.float() + 0.1 * torch.randn(B, T, device="cuda")).to(torch.bfloat16)
    ref = (lp.float() + 0.3 * torch.randn(B, T, device="cuda")).to(torch.bfloat16)
    adv = torch.randn(B, T, device="cuda")
    ids = torch.randint(-1, 2, (B, T), device="cuda")
    return lp.requires_grad_(True), old, ref, adv, ids


def _graph_time(fn, reps=50):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return statistics.median(times)


def run(quick: bool = False) -> list[dict]:
    rows = []
    s = shape("gpu", "policy_loss")
    B, T = s["B"], s["T"]
    n = B * T
    kw = dict(kl_coef=(0.1, 0.01), clip_eps=0.2)
    moved = n * (2 + 2 + 2 + 4 + 8 + 2)
    variants = [
        ("chained_torch_reference", lambda lp, old, ref, adv, ids: torch.autograd.grad(
            policy_loss_reference(lp, adv, ids, old_logprobs=old, ref_logprobs=ref, **kw)[0], lp)),
        ("torch_backend", lambda lp, old, ref, adv, ids: torch.autograd.grad(
            policy_loss(lp, adv, ids, old_logprobs=old, ref_logprobs=ref, backend="torch", **kw)[0], lp)),
        ("cuda_ext", lambda lp, old, ref, adv, ids: torch.autograd.grad(
            policy_loss(lp, adv, ids, old_logprobs=old, ref_logprobs=ref, backend="cuda", **kw)[0], lp)),
    ]
    for variant, fn in variants:
        try:
            res = bench(fn, lambda: _pg_inputs(B, T), rep=5 if quick else 10)
        except Exception as e:  # a backend that is not live on this machine
            rows.append({"op": "policy_loss", "shape": f"B={B},T={T}", "variant": variant, "error": str(e)[:160]})
            continue
        rows.append(row("policy_loss", f"B={B},T={T},K=2,bf16", variant, res, bytes_moved=moved))

    a = shape("gpu", "turn_advantages")
    Ba, G = a["B"], a["group"]
    rewards = torch.randint(0, 2, (Ba, a["K"]), device="cuda").float()
    gids = torch.randperm(Ba, device="cuda") // G
    tids = torch.randint(-1, a["K"], (Ba, T), device="cuda")

    def adv_fn():
        return token_advantages(turn_advantages(rewards, gids, estimator="rloo", shaping_alpha=10.0), tids)

    for variant in ("cuda_ext", "torch"):
        try:
            if variant == "torch":  # the reference reads ids on the host (torch.unique): eager only
                f = lambda: token_advantages(turn_advantages(rewards, gids, backend="torch"), tids,  # noqa: E731
                                             backend="torch")
                res = bench(lambda: f(), lambda: (), rep=20)
                rows.append({"op": "turn+token_advantages", "shape": f"B={Ba},T={T},K=2", "variant": "torch_eager",
                             "us": res["median_s"] * 1e6})
                continue
            res = bench(lambda: adv_fn(), lambda: (), rep=20)
            rows.append({"op": "turn+token_advantages", "shape": f"B={Ba},T={T},K=2", "variant": "cuda_eager",
                         "us": res["median_s"] * 1e6})
            rows.append({"op": "turn+token_advantages", "shape": f"B={Ba},T={T},K=2", "variant": "cuda_graph",
                         "us": _graph_time(adv_fn) * 1e6, "target_us": 50})
            rows.append({"op": "turn_advantages", "shape": f"B={Ba},K=2", "variant": "cuda_graph",
                         "us": _graph_time(lambda: turn_advantages(rewards, gids, shaping_alpha=10.0)) * 1e6})
        except Exception as e:
            rows.append({"op": "turn+token_advantages", "shape": f"B={Ba}", "variant": variant, "error": str(e)[:160]})
    return rows


if __name__ == "__main__":
    import json
    import sys

    for r in run(quick="--quick" in sys.argv):
        print(json.dumps(r))
