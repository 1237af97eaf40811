"""benchmarks/cpu_floor.py's arithmetic: the profiler's matmul FLOPs, fused ops included, and the floor."""
import torch

from benchmarks import cpu_floor


def test_matmul_profile_counts_executed_matmuls_fused_ops_included():
    from score_kernels import linear_logprobs

    a, b, w = torch.randn(64, 32), torch.randn(32, 48), torch.randn(40, 32)
    h, W, t = torch.randn(100, 64), torch.randn(5000, 64), torch.randint(0, 5000, (100,))
    got = cpu_floor.matmul_profile(lambda: (a @ b, torch.nn.functional.linear(a, w), a * 2))
    assert got["matmul_flops"] == 2 * 64 * 32 * (48 + 40)  # the elementwise product is not a matmul
    assert 0 < got["matmul_share"] <= 1
    # the fused log-probs' vocabulary tiles are counted, not hidden inside the custom op
    fused = cpu_floor.matmul_profile(lambda: linear_logprobs(h, W, t))
    assert fused["matmul_flops"] == 2 * 100 * 64 * 5000


def test_matmul_count_agrees_with_the_profile_on_plain_matmuls():
    a, b, w = torch.randn(64, 32), torch.randn(32, 48), torch.randn(40, 32)
    fn = lambda: (a @ b, torch.nn.functional.linear(a, w), torch.bmm(a[None], b[None]))
    assert cpu_floor.matmul_count(fn)["matmul_flops"] == cpu_floor.matmul_profile(fn)["matmul_flops"] == \
        2 * 64 * 32 * (48 + 40 + 48)


def test_floor_and_peak():
    side = cpu_floor.floor({"matmul_gflop": 10.0, "time_s": 2.0}, peak=50.0)
    assert side["floor_s"] == 0.2 and side["achieved_matmul_gflops"] == 5.0
    pk = cpu_floor.peak_gflops(shapes=((64, 64, 64),), reps=1)
    assert pk["peak"] == pk["per_shape"]["64x64x64"] > 0
