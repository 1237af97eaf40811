"""GPU benchmark: per-token log-probs from hidden states (bf16), forward+backward, beside its peers.

Every variant runs in this one process on the same inputs:
  naive_torch    log_softmax((h @ W.T).float()).gather (what a trainer writes by hand)
  ours           score_kernels.linear_logprobs (Triton), and ours+entropy (return_entropy=True)
  ours_gemm      the same op with impl="gemm" (cuBLAS GEMMs, Triton epilogues; 64 MiB logits chunks),
                 and ours_gemm_cache1G (1 GiB bf16 cache of logits chunks read by the backward)
  cce            Cut Cross-Entropy linear_cross_entropy(e, c, targets, reduction="none"); its default
                 filter_eps="high" skips gradient tiles it deems negligible; cce_exact (filter_eps=None)
                 does not
  liger          Liger-Kernel's fused linear cross-entropy, reduction="none" (per-token loss)
The peers return the per-token loss, i.e. -log-prob; it is negated so that every variant is checked
against naive on the same tokens (max_abs_err, fp32 log-probs). Useful FLOPs: 2NdV forward, 6NdV
forward+backward (TF/s = 6NdV / t, % of the bf16 matmul peak calibrated in the same run).
extra_mem_gb: torch.cuda.max_memory_allocated over the inputs during the call, the (h, W) gradients
included (grads_gb of it).
"""
import torch

from benchmarks import gpu_timing as gt
from benchmarks.shapes import shape

OP = "linear_logprobs"
SMOKE_SHAPES = [{"N": 21, "d": 16, "V": 131}]


def _naive(h, w, t):
    return torch.log_softmax((h @ w.t()).float(), dim=-1).gather(-1, t[:, None]).squeeze(-1)


def _ours(h, w, t):
    from score_kernels import linear_logprobs
    return linear_logprobs(h, w, t, backend="triton")


def _ours_entropy(h, w, t):
    from score_kernels import linear_logprobs
    return linear_logprobs(h, w, t, return_entropy=True, backend="triton")


def _cce(filter_eps):
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as e:  # noqa: BLE001  (any import failure means: not available)
        return f"not installed ({type(e).__name__}: {e})"
    return lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none", filter_eps=filter_eps)


def _liger():
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception as e:  # noqa: BLE001
        return f"not installed ({type(e).__name__}: {e})"
    return lambda h, w, t: -liger_fused_linear_cross_entropy(h, w, t, reduction="none")


def _ours_gemm(chunk_mb: int, cache_mb: int):
    """impl="gemm" (cuBLAS GEMMs per vocab chunk, Triton epilogues) at one chunk / logits-cache budget.
    The budgets are module settings read at each call (docs/fused-logprobs.md), set here per call."""
    def fn(h, w, t):
        import score_kernels._vocab_tiles as vt
        from score_kernels import linear_logprobs
        saved = vt.GPU_CHUNK_BYTES, vt.GPU_CACHE_BYTES
        vt.GPU_CHUNK_BYTES, vt.GPU_CACHE_BYTES = chunk_mb << 20, cache_mb << 20
        try:
            return linear_logprobs(h, w, t, backend="triton", impl="gemm")
        finally:
            vt.GPU_CHUNK_BYTES, vt.GPU_CACHE_BYTES = saved
    return fn


def variants():
    """Ours and naive first, then our cuBLAS-GEMM path at two budgets, then the peers, each group a pass
    over the shapes: a peer's first call (Triton autotuning, compiles) can take long, and must not cost
    ours a shape."""
    return [[("naive_torch", _naive), ("ours", _ours), ("ours+entropy", _ours_entropy)],
            [("ours_gemm", _ours_gemm(64, 0)), ("ours_gemm_cache1G", _ours_gemm(64, 1024))],
            [("liger", _liger()), ("cce", _cce("high")), ("cce_exact", _cce(None))]]


def shapes(quick: bool = False) -> list[dict]:
    if gt.smoke():
        return SMOKE_SHAPES
    # the gate's shape first, then the largest (both have targets), then Qwen2.5-0.5B's lm_head
    out = list(reversed(shape("gpu", OP))) + [shape("gpu", "linear_logprobs_qwen05b")]
    return [out[0], out[-1]] if quick else out


def _split(out):
    """(logprobs, sum of every output to differentiate): ours+entropy returns (lp, entropy)."""
    if isinstance(out, tuple):
        return out[0], out[0], out[1]
    return out, out, None


def run(quick: bool = False):
    naive = {}  # (shape, mode) -> naive's row, for the speed-up and memory notes
    for group in variants():
        for sh in shapes(quick):
            yield from _run_shape(sh, group, naive)


def _run_shape(sh, group, naive):
    dev = gt.device()
    dt = torch.bfloat16 if gt.on_gpu() else torch.float32
    N, d, V = sh["N"], sh["d"], sh["V"]
    big = N * V > 2e9
    reps = {"n_inputs": 2, "warmup": 1, "rep": 3} if big else {"n_inputs": 2, "warmup": 2, "rep": 6}
    tag = f"N={N},d={d},V={V}"
    grads_gb = (V * d + N * d) * dt.itemsize / 1e9

    def make():
        h = (torch.randn(N, d, device=dev) * 0.5).to(dt).requires_grad_(True)
        w = (torch.randn(V, d, device=dev) * 0.02).to(dt).requires_grad_(True)
        t = torch.randint(0, V, (N,), device=dev)
        return h, w, t, torch.randn(N, device=dev)

    probe = make()
    with torch.no_grad():
        ref = _naive(*probe[:3])
    for name, fn in group:
        if isinstance(fn, str):
            yield gt.error_row(OP, tag, name, fn)
            continue
        if gt.time_left() < (20 if big else 5):
            yield gt.error_row(OP, tag, name, "skipped: benchmark time budget spent")
            continue
        try:
            with torch.no_grad():
                lp = _split(fn(*probe[:3]))[0]
            err = float((lp.float() - ref).abs().max())
        except Exception as e:  # noqa: BLE001  (a variant that fails is reported, not fatal)
            yield gt.error_row(OP, tag, name, e)
            continue
        modes = ("fwd", "fwd+bwd") if name in ("naive_torch", "ours") and not gt.smoke() else ("fwd+bwd",)
        for mode in modes:
            if mode == "fwd":
                def call(h, w, t, g, fn=fn):
                    with torch.no_grad():
                        return fn(h, w, t)
                flops = 2 * N * d * V
            else:
                def call(h, w, t, g, fn=fn):
                    _, y, ent = _split(fn(h, w, t))
                    loss = (y.float() * g).sum()
                    if ent is not None:
                        loss = loss + (ent.float() * g).sum()
                    return torch.autograd.grad(loss, (h, w))
                flops = 6 * N * d * V
            try:
                res = gt.bench(call, make, **reps)
            except Exception as e:  # noqa: BLE001
                yield gt.error_row(OP, tag, f"{name} {mode}", e)
                continue
            r = gt.row(OP, tag, f"{name} {mode}", res, flops=flops)
            r["max_abs_err_vs_naive"] = err
            if mode == "fwd+bwd":
                r["grads_gb"] = grads_gb
            if name == "naive_torch":
                naive[(tag, mode)] = r
            elif (tag, mode) in naive:
                b = naive[(tag, mode)]
                r["speedup_vs_naive"] = b["ms"] / r["ms"]
                if r["extra_mem_gb"] is not None and b["extra_mem_gb"]:
                    r["mem_vs_naive"] = r["extra_mem_gb"] / b["extra_mem_gb"]
                r["note"] = f"{r['speedup_vs_naive']:.2f}x naive" + (
                    f", mem {r['mem_vs_naive']:.2f}x" if "mem_vs_naive" in r else "") + f", err {err:.1e}"
            yield r
            gt.empty_cache()
    del probe, ref
    gt.empty_cache()


def sweep(N=8192, d=2048, V=128256) -> list[dict]:
    """Tile/launch configurations of the Triton kernels, each timed alone (forward statistics;
    backward = dz kernels + GEMMs), plus the bare cuBLAS GEMM time of the backward for reference.
    Drives the shared vocab-tile launchers (score_kernels._vocab_tiles) directly: a tuning aid, not part
    of the device check."""
    import score_kernels._vocab_tiles as lp_mod
    h = (torch.randn(N, d, device="cuda") * 0.5).bfloat16()
    w = (torch.randn(V, d, device="cuda") * 0.02).bfloat16()
    t = torch.randint(0, V, (N,), device="cuda")
    g = torch.randn(N, device="cuda")
    lse, _, _ = lp_mod.triton_forward_stats(h, w, None, t, 1.0, entropy=False)
    ent = torch.zeros_like(lse)
    out = []
    mk = lambda: ()
    res = gt.bench(lambda: (torch.mm(torch.mm(h, w.t()).t(), h), torch.mm(torch.mm(h, w.t()), w)), mk, n_inputs=1,
                   warmup=1, rep=3)
    out.append({"config": "cublas 2 fwd-shaped + 2 bwd GEMMs", "ms": res["median_s"] * 1e3,
                "tflops": 8 * N * d * V / res["median_s"] / 1e12})
    cfg0 = dict(lp_mod.GPU_CONFIGS["lp16"])
    for bn, bv, bk, nw, ns in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4),
                               (256, 128, 64, 8, 3), (128, 256, 32, 8, 4), (64, 256, 64, 4, 3)]:
        lp_mod.GPU_CONFIGS["lp16"].update(BN=bn, BV=bv, BK=bk, num_warps=nw, num_stages=ns)
        row_ = {"config": f"BN={bn} BV={bv} BK={bk} warps={nw} stages={ns}"}
        try:
            f = gt.bench(lambda: lp_mod.triton_forward_stats(h, w, None, t, 1.0, entropy=False), mk, n_inputs=1,
                         warmup=1, rep=5)
            b = gt.bench(lambda: lp_mod.triton_backward(h, w, None, t, lse, ent, g, None, 1.0, True, True, False),
                         mk, n_inputs=1, warmup=1, rep=3)
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

    from benchmarks.gpu_bench import format_table

    peak = gt.calibrate()
    print(f"peak {peak}", flush=True)
    rs = list(run(quick="--quick" in sys.argv))
    print(format_table(rs), flush=True)
    sw = sweep() if "--sweep" in sys.argv else []
    if len(sys.argv) > 1 and sys.argv[-1].endswith(".json"):
        with open(sys.argv[-1], "w") as f:
            json.dump({"peak": peak, "rows": rs, "sweep": sw}, f, indent=1)
