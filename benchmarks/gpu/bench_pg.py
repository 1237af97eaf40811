"""GPU benchmark: policy_loss forward+backward (bandwidth-bound) and turn/token advantages.

policy_loss: B*T = 1M tokens, K = 2, bf16 log-probs (policy, old, ref), fp32 advantages, int64
turn ids, PPO clip + per-turn k3 KL. Variants, in this one process on the same inputs:
  reference_chained         policy_loss_reference (the plain autograd chain)
  torch_compile             torch.compile of that reference (the fused loss a user gets for free;
                            compile time is reported apart, not timed)
  torch_backend / ours      policy_loss(backend="torch") / policy_loss() (the CUDA extension)
`bytes_moved` is the minimum any implementation must move (read every input once, write the bf16
gradient once: 20 B/token), so frac_peak = that / time / measured copy bandwidth. Ours moves 24
B/token (dl is stored in the forward and scaled in backward).

advantages: turn_advantages (rloo + alpha=10 bonus) + token_advantages on B=1024 samples, T=1024.
Everything is timed eagerly (Python dispatch included: at 1M tokens that dominates) and as replayed
CUDA graphs (device time only; capture also proves no op synchronises with the host).
"""
import statistics
import time

import torch

from benchmarks import gpu_timing as gt
from benchmarks.shapes import shape
from score_kernels import policy_loss, policy_loss_reference, token_advantages, turn_advantages

SMOKE = {"policy_loss": {"B": 4, "T": 33}, "turn_advantages": {"B": 16, "K": 2, "group": 4}}
KW = {"kl_coef": (0.1, 0.01), "clip_eps": 0.2}


def _pg_inputs(B, T):
    dev = gt.device()
    lp = (-torch.rand(B, T, device=dev) * 3).to(torch.bfloat16)
    old = (lp.float() + 0.1 * torch.randn(B, T, device=dev)).to(torch.bfloat16)
    ref = (lp.float() + 0.3 * torch.randn(B, T, device=dev)).to(torch.bfloat16)
    adv = torch.randn(B, T, device=dev)
    ids = torch.randint(-1, 2, (B, T), device=dev)
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


def _grad_of(loss_fn):
    def f(lp, old, ref, adv, ids):
        return torch.autograd.grad(loss_fn(lp, adv, ids, old_logprobs=old, ref_logprobs=ref, **KW)[0], lp)
    return f


def _compiled_reference():
    # the compiler's own fused kernels; on the CPU (smoke) only dynamo's capture, no C++ build
    backend = "inductor" if gt.on_gpu() else "eager"
    return torch.compile(policy_loss_reference, backend=backend, dynamic=False)


def _shape(op):
    return SMOKE[op] if gt.smoke() else shape("gpu", op)


def run(quick: bool = False):
    s = _shape("policy_loss")
    B, T = s["B"], s["T"]
    n = B * T
    moved = n * (2 + 2 + 2 + 4 + 8 + 2)
    shp = f"B={B},T={T},K=2,bf16"
    copy_gbs = gt.calibrate()["copy_gbs"]
    if gt.on_gpu():  # what a plain device copy of the same bytes reaches at this size (launch + ramp included)
        bufs = [(torch.empty(moved // 2, dtype=torch.uint8, device="cuda"),
                 torch.empty(moved // 2, dtype=torch.uint8, device="cuda")) for _ in range(3)]
        t = _graph_time([lambda d=d, s_=s_: d.copy_(s_) for d, s_ in bufs])
        yield _bw_row("policy_loss", shp, "copy_same_bytes[graph]", t, moved, copy_gbs)
        del bufs
    # ours before torch.compile: a compile (or its graph capture) that goes wrong must not cost our rows
    variants = [("reference_chained", lambda: _grad_of(policy_loss_reference)),
                # on a GPU the CUDA extension by name: a failed build shows as an error, not as the torch path
                ("ours", lambda: _grad_of(lambda *a, **k: policy_loss(*a, backend="cuda" if gt.on_gpu() else None,
                                                                      **k))),
                ("torch_backend", lambda: _grad_of(lambda *a, **k: policy_loss(*a, backend="torch", **k))),
                ("torch_compile", lambda: _grad_of(_compiled_reference()))]
    base_ms = None
    for variant, build in variants:
        if gt.time_left() < 10:
            yield gt.error_row("policy_loss", shp, variant, "skipped: benchmark time budget spent")
            continue
        try:
            fn = build()
            t0 = time.perf_counter()
            fn(*_pg_inputs(B, T))  # compiles (torch.compile, Triton, the extension's first call) untimed
            gt.sync()
            first_s = time.perf_counter() - t0
            res = gt.bench(fn, lambda: _pg_inputs(B, T), rep=5 if quick else 10)
            r = gt.row("policy_loss", shp, variant + "[eager]", res, bytes_moved=moved)
            if variant == "torch_compile":
                r["compile_s"] = first_s
                r["note"] = f"compile {first_s:.1f}s"
            if base_ms is None:
                base_ms = r["ms"]
            else:
                r["speedup_vs_chained"] = base_ms / r["ms"]
                r["note"] = (r.get("note", "") + f" {r['speedup_vs_chained']:.2f}x chained").strip()
            yield r
            # not the compiled one: a capture that fails inside dynamo can poison the process's CUDA context
            if gt.on_gpu() and variant != "torch_compile":
                sets = [_pg_inputs(B, T) for _ in range(3)]
                t = _graph_time([lambda x=x, fn=fn: fn(*x) for x in sets])
                yield _bw_row("policy_loss", shp, variant + "[graph]", t, moved, copy_gbs)
                del sets
        except Exception as e:  # noqa: BLE001  a backend that is not live on this machine
            yield gt.error_row("policy_loss", shp, variant, e)
        gt.empty_cache()
    if not quick and gt.on_gpu() and gt.time_left() > 20:  # 16M tokens: the kernel's own bandwidth
        Bl = 16 * B
        for variant, fn in variants[1:3]:  # ours, torch_backend
            try:
                fn = fn()
                sets = [_pg_inputs(Bl, T) for _ in range(2)]
                t = _graph_time([lambda x=x, fn=fn: fn(*x) for x in sets], reps=10)
                yield _bw_row("policy_loss", f"B={Bl},T={T},K=2,bf16", variant + "[graph]", t, moved * 16, copy_gbs)
                del sets
            except Exception as e:  # noqa: BLE001
                yield gt.error_row("policy_loss", f"B={Bl},T={T},K=2,bf16", variant, e)
            gt.empty_cache()

    a = _shape("turn_advantages")
    Ba, G = a["B"], a["group"]
    dev = gt.device()
    rewards = torch.randint(0, 2, (Ba, a["K"]), device=dev).float()
    gids = torch.randperm(Ba, device=dev) // G
    tids = torch.randint(-1, a["K"], (Ba, T), device=dev)
    ashp = f"B={Ba},T={T},K={a['K']}"

    def adv_fn():
        return token_advantages(turn_advantages(rewards, gids, estimator="rloo", shaping_alpha=10.0), tids)

    def torch_fn():
        return token_advantages(turn_advantages(rewards, gids, backend="torch"), tids, backend="torch")

    for variant in ("torch", "ours"):
        try:
            if variant == "torch":  # the reference reads ids on the host (torch.unique): eager only
                res = gt.bench(torch_fn, lambda: (), rep=20)
                yield {"op": "turn+token_advantages", "shape": ashp, "variant": "torch_eager",
                       "us": res["median_s"] * 1e6, "ms": res["median_s"] * 1e3}
                continue
            res = gt.bench(adv_fn, lambda: (), rep=20)  # the extension where it is built, else torch
            yield {"op": "turn+token_advantages", "shape": ashp, "variant": "ours_eager",
                   "us": res["median_s"] * 1e6, "ms": res["median_s"] * 1e3}
            if gt.on_gpu():
                t = _graph_time([adv_fn])
                yield {"op": "turn+token_advantages", "shape": ashp, "variant": "ours_graph",
                       "us": t * 1e6, "ms": t * 1e3, "target_us": 50}
                t = _graph_time([lambda: turn_advantages(rewards, gids, shaping_alpha=10.0)])
                yield {"op": "turn_advantages", "shape": f"B={Ba},K={a['K']}", "variant": "ours_graph",
                       "us": t * 1e6, "ms": t * 1e3}
        except Exception as e:  # noqa: BLE001
            yield gt.error_row("turn+token_advantages", ashp, variant, e)


if __name__ == "__main__":
    import json
    import sys

    for r in run(quick="--quick" in sys.argv):
        print(json.dumps(r))
