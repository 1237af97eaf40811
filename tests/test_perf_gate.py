"""The perf gate fails on a real regression and names it; the memory probe sees what a variant
allocates; the report renders from recorded runs.

The regression is injected through the harness's TEST-ONLY hook (SCORE_BENCH_TEST_HOOK: run `ours`
several times per round, or hold extra memory while it runs); the real op is never edited.
"""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "bench")
sys.path.insert(0, ROOT)

from benchmarks import memory_probe, report


def _gate(tmp_path, hook: str | None, *extra):
    env = {k: v for k, v in os.environ.items() if k != memory_probe.TEST_HOOK_ENV}
    env.pop("TRITON_INTERPRET", None)  # the benchmarks run ops as users do
    if hook:
        env[memory_probe.TEST_HOOK_ENV] = hook
    cmd = [sys.executable, "-m", "pytest", "benchmarks/test_bench_token_kl.py", "--perf-gate", "-q",
           "-p", "no:cacheprovider", "--bench-rounds", "5", "--benchmark-json", str(tmp_path / "b.json"), *extra]
    r = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return r.returncode, r.stdout + r.stderr


def test_gate_fails_on_slowed_op_and_extra_memory(tmp_path):
    # 4x the work and 64 MiB of ballast: well past the real thresholds in benchmarks/thresholds.yaml
    rc, out = _gate(tmp_path, "token_kl:slow=4,alloc_mb=64")
    assert rc != 0, out
    t = re.search(r"perf gate: token_kl \[.*\] on cpu: time ratio ours/baseline ([\d.]+) > threshold ([\d.]+) "
                  r"\(median ours ([\d.]+) (ms|s), baseline ([\d.]+) (ms|s);", out)
    assert t, out
    assert float(t.group(1)) > float(t.group(2))
    m = re.search(r"perf gate: token_kl \[.*\] on cpu: memory ratio ours/baseline ([\d.]+) > threshold ([\d.]+) "
                  r"\(peak extra ours ([\d.]+) MiB, baseline ([\d.]+) MiB\)", out)
    assert m, out
    assert float(m.group(3)) - float(m.group(4)) > 50  # the ballast is seen


def test_gate_passes_unhooked_and_names_missing_thresholds(tmp_path):
    rc, out = _gate(tmp_path, None)
    assert rc == 0, out
    empty = tmp_path / "thresholds.yaml"
    empty.write_text("cpu:\n  store_kv: {time: 1.0}\n")
    rc, out = _gate(tmp_path, None, "--bench-thresholds", str(empty))
    assert rc != 0 and "no threshold for token_kl" in out, out


def test_memory_probe_sees_allocation(monkeypatch):
    monkeypatch.setenv(memory_probe.TEST_HOOK_ENV, "token_kl:alloc_mb=32")
    hooked = memory_probe.probe_subprocesses("benchmarks.test_bench_token_kl", "token_kl", ["ours"])["ours"]
    monkeypatch.delenv(memory_probe.TEST_HOOK_ENV)
    plain = memory_probe.probe_subprocesses("benchmarks.test_bench_token_kl", "token_kl", ["ours"])["ours"]
    assert plain > 0
    assert abs((hooked - plain) - 32 * 2**20) < 2 * 2**20, (hooked, plain)


def test_report_renders_fixture(tmp_path):
    out, chart = tmp_path / "BENCHMARKS.md", tmp_path / "chart.png"
    assert report.main(["--pytest-dir", os.path.join(FIXTURES, "pytest"), "--gpu-dir", FIXTURES,
                        "--out", str(out), "--chart", str(chart)]) == 0
    md = out.read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| op")]
    # token_kl (cpu), linear_logprobs triton + liger (gpu), the two standalone summaries; unpaired store_kv dropped
    assert len(rows) == 5, md
    roll = next(r for r in rows if r.startswith("| engine (two-turn rollout) |"))
    assert "| 25.00 ms | 50.00 ms | 0.50 | 2.00x |" in roll, roll  # time per generated token
    kl = next(r for r in rows if r.startswith("| token_kl |"))
    # the gate's interleaved baseline (5 ms) is the pair's baseline: ratio 0.4, memory 0.5
    assert "Test CPU" in kl and "| 2.00 ms | 5.00 ms | 0.40 | 2.50x |" in kl and "| 0.50 |" in kl, kl
    tri = next(r for r in rows if r.startswith("| linear_logprobs (triton) |"))
    assert "Test GPU" in tri and "| 0.50 | 2.00x |" in tri and "| 0.05 |" in tri and "| 57% |" in tri, tri
    summ = next(r for r in rows if "cpu_summary.json" in r)
    assert summ.startswith("| linear_logprobs | N=4096 d=576 V=49152 dtype=float32 | x86_64 2 threads |"), summ
    assert "| 1.25 | 0.80x |" in summ and "| 0.25 |" in summ, summ
    assert "![speed-up and memory ratio per op](chart.png)" in md
    assert chart.stat().st_size > 5000 and chart.read_bytes()[:4] == b"\x89PNG"


def test_report_without_records(tmp_path):
    out = tmp_path / "B.md"
    assert report.main(["--pytest-dir", str(tmp_path), "--gpu-dir", str(tmp_path), "--out", str(out),
                        "--chart", str(tmp_path / "c.png")]) == 0
    assert "no recorded runs" in out.read_text()
