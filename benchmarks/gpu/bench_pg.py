"""GPU benchmark: policy_loss forward+backward (bandwidth-bound) and turn/token advantages.

policy_loss: B*T = 1M tokens, K = 2, bf16 log-probs (policy, old, ref), fp32 advantages, int64
turn ids, PPO clip + per-turn KL. `bytes_moved` is the minimum any implementation must move (read
every input once, write the bf16 gradient once: 20 B/token), so frac_peak = that / time / measured
copy bandwidth. Ours moves 24 B/token (dl is stored in the forward and scaled in backward).

advantages: turn_advantages (rloo + alpha=10 bonus) + token_advantages on B=1024 samples, T=1024.
Everything is timed eagerly (Python dispatch included: at 1M tokens that dominates) and as replayed
CUDA graphs (device time only; capture also proves no op synchronises with the host).
"""
import statistics

import torch

from benchmarks.gpu_timing import bench, calibrate, row
from benchmarks.shapes import shape
from score_kernels import policy_loss, policy_loss_reference, token_advantages, turn_advantages


def _pg_inputs(B, T):
    lp = (-torch.rand(B, T, device="cuda") * 3).to(torch.bfloat16)
    old = (lp.float() + 0.1 * torch.randn(B, T, device="cuda")).to(torch.bfloat16)
    ref = (lp.float() + 0.3 * torch.randn(B, T, device="cuda")).to(torch.bfloat16)
    adv = torch.randn(B, T, device="cuda")
    ids = torch.randint(-1, 2, (B, T), device="cuda")
    return lp.requires_grad_(True), old, ref, adv, ids


def _graph_time(fns, reps=30):
    """Median seconds of one replay, rotating one captured graph per input set (so nothing is
    timed out of L2 from the previous replay). Capture fails if an op syncs with the host."""
    graphs = []
    for fn in fns:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        graphs.append(g)
    for g in graphs:
        g.replay()
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graphs[i % len(graphs)].replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return statistics.median(times)


def _bw_row(op, shp, variant, t, moved, copy_gbs):
    gbs = moved / t / 1e9
    return {"op": op, "shape": shp, "variant": variant, "ms": t * 1e3, "gbs": gbs, "frac_peak": gbs / copy_gbs}


def run(quick: bool = False) -> list[dict]:
    rows = []
    s = shape("gpu", "policy_loss")
    B, T = s["B"], s["T"]
    n = B * T
    kw = {"kl_coef": (0.1, 0.01), "clip_eps": 0.2}
    moved = n * (2 + 2 + 2 + 4 + 8 + 2)
    variants = [
        ("chained_torch_reference", lambda lp, old, ref, adv, ids: torch.autograd.grad(
            policy_loss_reference(lp, adv, ids, old_logprobs=old, ref_logprobs=ref, **kw)[0], lp)),
        ("torch_backend", lambda lp, old, ref, adv, ids: torch.autograd.grad(
            policy_loss(lp, adv, ids, old_logprobs=old, ref_logprobs=ref, backend="torch", **kw)[0], lp)),
        ("cuda_ext", lambda lp, old, ref, adv, ids: torch.autograd.grad(
            policy_loss(lp, adv, ids, old_logprobs=old, ref_logprobs=ref, backend="cuda", **kw)[0], lp)),
    ]
    shp = f"B={B},T={T},K=2,bf16"
    copy_gbs = calibrate()["copy_gbs"]
    # what a plain device copy of the same bytes reaches at this size (launch + ramp included)
    bufs = [(torch.empty(moved // 2, dtype=torch.uint8, device="cuda"),
             torch.empty(moved // 2, dtype=torch.uint8, device="cuda")) for _ in range(3)]
    t = _graph_time([lambda d=d, s_=s_: d.copy_(s_) for d, s_ in bufs])
    rows.append(_bw_row("policy_loss", shp, "copy_same_bytes[graph]", t, moved, copy_gbs))
    del bufs
    for variant, fn in variants:
        try:
            res = bench(fn, lambda: _pg_inputs(B, T), rep=5 if quick else 10)
            rows.append(row("policy_loss", shp, variant + "[eager]", res, bytes_moved=moved))
            sets = [_pg_inputs(B, T) for _ in range(3)]
            t = _graph_time([lambda x=x, fn=fn: fn(*x) for x in sets])
            rows.append(_bw_row("policy_loss", shp, variant + "[graph]", t, moved, copy_gbs))
            del sets
        except Exception as e:  # noqa: BLE001  a backend that is not live on this machine
            rows.append({"op": "policy_loss", "shape": shp, "variant": variant, "error": str(e)[:200]})
    if not quick:  # 16M tokens: the kernel's own bandwidth, host overhead amortised
        Bl = 16 * B
        for variant, fn in variants[1:]:
            try:
                sets = [_pg_inputs(Bl, T) for _ in range(2)]
                t = _graph_time([lambda x=x, fn=fn: fn(*x) for x in sets], reps=10)
                rows.append(_bw_row("policy_loss", f"B={Bl},T={T},K=2,bf16", variant + "[graph]", t, moved * 16,
                                    copy_gbs))
                del sets
            except Exception as e:  # noqa: BLE001
                rows.append({"op": "policy_loss", "shape": f"B={Bl}", "variant": variant, "error": str(e)[:200]})

    a = shape("gpu", "turn_advantages")
    Ba, G = a["B"], a["group"]
    rewards = torch.randint(0, 2, (Ba, a["K"]), device="cuda").float()
    gids = torch.randperm(Ba, device="cuda") // G
    tids = torch.randint(-1, a["K"], (Ba, T), device="cuda")

    def adv_fn():
        return token_advantages(turn_advantages(rewards, gids, estimator="rloo", shaping_alpha=10.0), tids)

    def torch_fn():
        return token_advantages(turn_advantages(rewards, gids, backend="torch"), tids, backend="torch")

    for variant in ("cuda_ext", "torch"):
        try:
            if variant == "torch":  # the reference reads ids on the host (torch.unique): eager only
                res = bench(torch_fn, lambda: (), rep=20)
                rows.append({"op": "turn+token_advantages", "shape": f"B={Ba},T={T},K=2", "variant": "torch_eager",
                             "us": res["median_s"] * 1e6})
                continue
            res = bench(adv_fn, lambda: (), rep=20)
            rows.append({"op": "turn+token_advantages", "shape": f"B={Ba},T={T},K=2", "variant": "cuda_eager",
                         "us": res["median_s"] * 1e6})
            rows.append({"op": "turn+token_advantages", "shape": f"B={Ba},T={T},K=2", "variant": "cuda_graph",
                         "us": _graph_time([adv_fn]) * 1e6, "target_us": 50})
            rows.append({"op": "turn_advantages", "shape": f"B={Ba},K=2", "variant": "cuda_graph",
                         "us": _graph_time([lambda: turn_advantages(rewards, gids, shaping_alpha=10.0)]) * 1e6})
        except Exception as e:  # noqa: BLE001
            rows.append({"op": "turn+token_advantages", "shape": f"B={Ba}", "variant": variant, "error": str(e)[:160]})
    return rows


if __name__ == "__main__":
    import json
    import sys

    for r in run(quick="--quick" in sys.argv):
        print(json.dumps(r))
