"""GPU benchmark: fused log-probs from hidden states (bf16), forward and forward+backward.

Variants: naive torch (bf16 logits, fp32 log_softmax, gather), ours (Triton), and Liger-Kernel's
fused linear cross entropy / Cut Cross-Entropy when importable (they return a loss, not per-token
log-probs; they do the same GEMM work). Useful FLOPs: 2NdV forward, 6NdV forward+backward.
extra_mem_gb counts everything allocated during the call, gradients included (grads_gb of it).
"""
import torch

from benchmarks.gpu_timing import bench, row
from benchmarks.shapes import shape
from score_kernels import linear_logprobs


def _naive(h, w, t):
    lsm = torch.log_softmax((h @ w.t()).float(), dim=-1)
    return lsm.gather(-1, t[:, None]).squeeze(-1)


def _ours(h, w, t):
    return linear_logprobs(h, w, t, backend="triton")


def _liger():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:  # noqa: BLE001  (any import failure means: not available)
        return None
    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return lambda h, w, t: loss(w, h, t)


def _cce():
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception:  # noqa: BLE001
        return None
    return lambda h, w, t: linear_cross_entropy(h, w, t, reduction="none")


def run(quick: bool = False) -> list[dict]:
    rows = []
    shapes = shape("gpu", "linear_logprobs")
    if quick:
        shapes = shapes[1:]
    for sh in shapes:
        N, d, V = sh["N"], sh["d"], sh["V"]
        big = N * V > 2e9
        reps = {"n_inputs": 2, "warmup": 1, "rep": 3} if big else {"n_inputs": 2, "warmup": 2, "rep": 6}
        tag = f"N={N},d={d},V={V}"
        grads_gb = (V * d + N * d) * 2 / 1e9

        def make(N=N, d=d, V=V):
            h = (torch.randn(N, d, device="cuda") * 0.5).bfloat16().requires_grad_(True)
            w = (torch.randn(V, d, device="cuda") * 0.02).bfloat16().requires_grad_(True)
            t = torch.randint(0, V, (N,), device="cuda")
            return h, w, t, torch.randn(N, device="cuda")

        variants = [("naive_torch", _naive), ("ours_triton", _ours), ("liger_flce", _liger()), ("cce", _cce())]
        for name, fn in variants:
            if fn is None:
                rows.append({"op": "linear_logprobs", "shape": tag, "variant": name, "error": "not installed"})
                continue
            for mode in ("fwd", "fwd+bwd"):
                if mode == "fwd":
                    def call(h, w, t, g, fn=fn):
                        with torch.no_grad():
                            return fn(h, w, t)
                    flops = 2 * N * d * V
                else:
                    def call(h, w, t, g, fn=fn):
                        out = fn(h, w, t)
                        out = out * g if out.dim() else out
                        return torch.autograd.grad(out.sum(), (h, w))
                    flops = 6 * N * d * V
                try:
                    res = bench(call, make, **reps)
                except torch.OutOfMemoryError as e:
                    rows.append({"op": "linear_logprobs", "shape": tag, "variant": f"{name} {mode}",
                                 "error": "OOM: " + str(e)[:80]})
                    torch.cuda.empty_cache()
                    continue
                except Exception as e:  # noqa: BLE001  (a variant that fails is reported, not fatal)
                    rows.append({"op": "linear_logprobs", "shape": tag, "variant": f"{name} {mode}",
                                 "error": f"{type(e).__name__}: {str(e)[:100]}"})
                    torch.cuda.empty_cache()
                    continue
                r = row("linear_logprobs", tag, f"{name} {mode}", res, flops=flops)
                if mode == "fwd+bwd":
                    r["grads_gb"] = grads_gb
                rows.append(r)
                torch.cuda.empty_cache()
    return rows


def sweep(N=8192, d=2048, V=128256) -> list[dict]:
    """Tile/launch configurations of the Triton kernels, each timed alone (forward statistics;
    backward = dz kernels + GEMMs), plus the bare cuBLAS GEMM time of the backward for reference."""
    import sys

    import score_kernels.linear_logprobs  # noqa: F401
    lp_mod = sys.modules["score_kernels.linear_logprobs"]
    h = (torch.randn(N, d, device="cuda") * 0.5).bfloat16()
    w = (torch.randn(V, d, device="cuda") * 0.02).bfloat16()
    t = torch.randint(0, V, (N,), device="cuda")
    g = torch.randn(N, device="cuda")
    lse, _, _ = lp_mod.triton_forward_stats(h, w, None, t, 1.0, entropy=False)
    ent = torch.zeros_like(lse)
    out = []
    mk = lambda: ()
    res = bench(lambda: (torch.mm(torch.mm(h, w.t()).t(), h), torch.mm(torch.mm(h, w.t()), w)), mk, n_inputs=1,
                warmup=1, rep=3)
    out.append({"config": "cublas 2 fwd-shaped + 2 bwd GEMMs", "ms": res["median_s"] * 1e3,
                "tflops": 8 * N * d * V / res["median_s"] / 1e12})
    cfg0 = dict(lp_mod.GPU_CONFIGS["lp16"])
    for bn, bv, bk, nw, ns in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4),
                               (256, 128, 64, 8, 3), (128, 256, 32, 8, 4), (64, 256, 64, 4, 3)]:
        lp_mod.GPU_CONFIGS["lp16"].update(BN=bn, BV=bv, BK=bk, num_warps=nw, num_stages=ns)
        row_ = {"config": f"BN={bn} BV={bv} BK={bk} warps={nw} stages={ns}"}
        try:
            f = bench(lambda: lp_mod.triton_forward_stats(h, w, None, t, 1.0, entropy=False), mk, n_inputs=1,
                      warmup=1, rep=5)
            b = bench(lambda: lp_mod.triton_backward(h, w, None, t, lse, ent, g, None, 1.0, True, True, False), mk,
                      n_inputs=1, warmup=1, rep=3)
            row_.update(fwd_ms=f["median_s"] * 1e3, fwd_tflops=2 * N * d * V / f["median_s"] / 1e12,
                        bwd_ms=b["median_s"] * 1e3, bwd_tflops=4 * N * d * V / b["median_s"] / 1e12)
        except Exception as e:  # noqa: BLE001
            row_["error"] = f"{type(e).__name__}: {str(e)[:100]}"
        out.append(row_)
        print(row_, flush=True)
        torch.cuda.empty_cache()
    lp_mod.GPU_CONFIGS["lp16"].update(cfg0)
    return out


if __name__ == "__main__":
    import json
    import sys
    import time

    from benchmarks.gpu_bench import format_table
    from benchmarks.gpu_timing import calibrate

    t0 = time.time()
    peak = calibrate()
    print(f"peak {peak}", flush=True)
    rs = run(quick="--quick" in sys.argv)
    print(format_table(rs), flush=True)
    print(f"{time.time() - t0:.1f}s", flush=True)
    sw = sweep() if "--sweep" in sys.argv else []
    if len(sys.argv) > 1 and sys.argv[-1].endswith(".json"):
        with open(sys.argv[-1], "w") as f:
            json.dump({"peak": peak, "rows": rs, "sweep": sw}, f, indent=1)
