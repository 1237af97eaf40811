"""GPU benchmark: exact per-token KL(pi || pi_ref) over the full vocabulary, forward+backward (bf16).

  naive_torch   log_softmax of both logits (fp32), sum_v p (log p - log q); autograd to (h, W)
  ours          score_kernels.linear_kl (Triton), logits never stored
Both run in this process on the same inputs. Useful FLOPs: 4NdV forward (policy and reference
logits), 8NdV forward+backward (the reference side takes no gradient).
"""
import torch

from benchmarks import gpu_timing as gt
from benchmarks.shapes import shape

OP = "linear_kl"
SMOKE_SHAPE = {"N": 29, "d": 24, "V": 257}


def _naive(h, w, rh, rw):
    lp = torch.log_softmax((h @ w.t()).float(), dim=-1)
    with torch.no_grad():
        lq = torch.log_softmax((rh @ rw.t()).float(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _ours(h, w, rh, rw):
    from score_kernels import linear_kl
    return linear_kl(h, w, rh, rw, backend="triton")


def run(quick: bool = False):
    dev = gt.device()
    dt = torch.bfloat16 if gt.on_gpu() else torch.float32
    s = SMOKE_SHAPE if gt.smoke() else shape("gpu", OP)
    N, d, V = s["N"], s["d"], s["V"]
    tag = f"N={N},d={d},V={V}"

    def make():
        h = (torch.randn(N, d, device=dev) * 0.5).to(dt)
        w = (torch.randn(V, d, device=dev) * 0.02).to(dt)
        rh = (h.float() + 0.1 * torch.randn(N, d, device=dev)).to(dt)
        rw = (w.float() + 0.002 * torch.randn(V, d, device=dev)).to(dt)
        return h.requires_grad_(True), w.requires_grad_(True), rh, rw, torch.randn(N, device=dev)

    probe = make()
    with torch.no_grad():
        ref = _naive(*probe[:4])
    naive = None
    for name, fn in (("naive_torch", _naive), ("ours", _ours)):
        if gt.time_left() < 10:
            yield gt.error_row(OP, tag, name, "skipped: benchmark time budget spent")
            continue
        try:
            with torch.no_grad():
                err = float((fn(*probe[:4]).float() - ref).abs().max())

            def call(h, w, rh, rw, g, fn=fn):
                return torch.autograd.grad((fn(h, w, rh, rw).float() * g).sum(), (h, w))

            res = gt.bench(call, make, n_inputs=2, warmup=1, rep=3 if quick else 5)
        except Exception as e:  # noqa: BLE001  (reported, never fatal)
            yield gt.error_row(OP, tag, f"{name} fwd+bwd", e)
            continue
        r = gt.row(OP, tag, f"{name} fwd+bwd", res, flops=8 * N * d * V)
        r["max_abs_err_vs_naive"] = err
        if naive is None:
            naive = r
        else:
            r["speedup_vs_naive"] = naive["ms"] / r["ms"]
            r["note"] = f"{r['speedup_vs_naive']:.2f}x naive"
            if r["extra_mem_gb"] is not None and naive["extra_mem_gb"]:
                r["mem_vs_naive"] = r["extra_mem_gb"] / naive["extra_mem_gb"]
                r["note"] += f", mem {r['mem_vs_naive']:.2f}x"
            r["note"] += f", err {err:.1e}"
        yield r
        gt.empty_cache()
