"""GPU benchmark: token_kl forward+backward, bandwidth-bound."""
import torch

from benchmarks import gpu_timing as gt
from benchmarks.shapes import shape


def run(quick: bool = False):
    from score_kernels import token_kl, token_kl_reference

    n = 1000 if gt.smoke() else (1 << 22) if quick else shape("gpu", "token_kl")["n"]
    dev = gt.device()

    def make():
        lp = torch.randn(n, device=dev, dtype=torch.bfloat16).requires_grad_(True)
        return lp, torch.randn(n, device=dev, dtype=torch.bfloat16), torch.ones(n, device=dev)

    # fwd reads 2 bf16, writes fp32; bwd reads g fp32 + 2 bf16, writes bf16
    moved = n * (2 + 2 + 4) + n * (4 + 2 + 2 + 2)
    ext = "cuda" if gt.on_gpu() else "cpu"
    for variant, fn in [
        ("naive_torch", lambda lp, ref, g: torch.autograd.grad(token_kl_reference(lp, ref, "k3"), lp, g)),
        ("triton", lambda lp, ref, g: torch.autograd.grad(token_kl(lp, ref, "k3", backend="triton"), lp, g)),
        (f"{ext}_ext", lambda lp, ref, g: torch.autograd.grad(token_kl(lp, ref, "k3", backend=ext), lp, g)),
    ]:
        try:
            res = gt.bench(fn, make)
        except Exception as e:  # noqa: BLE001  a backend that is not live on this machine
            yield gt.error_row("token_kl", f"N={n}", variant, e)
            continue
        yield gt.row("token_kl", f"N={n}", variant, res, bytes_moved=moved)
