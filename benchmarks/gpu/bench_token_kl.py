"""GPU benchmark: token_kl forward+backward, bandwidth-bound."""
import torch

from benchmarks.gpu_timing import bench, row
from score_kernels import token_kl, token_kl_reference


def run(quick: bool = False) -> list[dict]:
    n = (1 << 22) if quick else (1 << 24)
    rows = []

    def make():
        lp = torch.randn(n, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
        return lp, torch.randn(n, device="cuda", dtype=torch.bfloat16), torch.ones(n, device="cuda")

    # fwd reads 2 bf16, writes fp32; bwd reads g fp32 + 2 bf16, writes bf16
    moved = n * (2 + 2 + 4) + n * (4 + 2 + 2 + 2)
    for variant, fn in [
        ("naive_torch", lambda lp, ref, g: torch.autograd.grad(token_kl_reference(lp, ref, "k3"), lp, g)),
        ("triton", lambda lp, ref, g: torch.autograd.grad(token_kl(lp, ref, "k3", backend="triton"), lp, g)),
        ("cuda_ext", lambda lp, ref, g: torch.autograd.grad(token_kl(lp, ref, "k3", backend="cuda"), lp, g)),
    ]:
        try:
            res = bench(fn, make)
        except Exception as e:  # a backend that is not live on this machine
            rows.append({"op": "token_kl", "shape": f"N={n}", "variant": variant, "error": str(e)[:120]})
            continue
        rows.append(row("token_kl", f"N={n}", variant, res, bytes_moved=moved))
    return rows
