"""The GPU benchmarks and scripts/device_check.sh, run where there is no GPU, so that the one prepared
device run cannot rot: every benchmark's CPU smoke mode (tiny shapes, Triton interpreted) through the
script's own plumbing (per-benchmark processes and time limits, partial rows, merge, table, JSON in
$OUT), the merge of a killed benchmark's partial rows, and the perf gate's null GPU limits."""
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import gpu_bench, gpu_timing

BENCHES = {"linear_logprobs", "engine", "score_step", "pg", "linear_kl", "token_kl", "paged_attention"}


def _ok(rows, op, variant):
    hit = [r for r in rows if r["op"] == op and r["variant"] == variant]
    assert hit, f"no row {op} / {variant}: {[(r['op'], r['variant']) for r in rows]}"
    assert "error" not in hit[0], hit[0]
    assert hit[0]["ms"] > 0, hit[0]
    return hit[0]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, TRITON_INTERPRET="1", SCORE_COMMIT="test")
    r = subprocess.run(["bash", "scripts/device_check.sh", "--dry-run", "--no-tests"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900, check=False)
    return r, out


def test_dry_run_writes_what_the_device_tool_brings_back(dry_run):
    r, out = dry_run
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    names = sorted(os.listdir(out))
    # the device tool returns at most 8 plain files named in letters, digits, '.', '_' and '-'
    assert len(names) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names), names
    assert all(os.path.isfile(out / n) for n in names), names
    assert {"device_check.log", "gpu_bench.json", "table.txt"} <= set(names), names
    assert "device check summary" in (out / "device_check.log").read_text()
    d = json.loads((out / "gpu_bench.json").read_text())
    assert d["commit"] == "test" and d["smoke"] is True and d["peak"]["matmul_bf16_tflops"] > 0
    assert set(d["benchmarks"]) == BENCHES, d["benchmarks"]
    assert all(v["status"] == "ok" for v in d["benchmarks"].values()), d["benchmarks"]
    assert d["failed"] == []


def test_dry_run_rows_side_by_side(dry_run):
    _, out = dry_run
    rows = json.loads((out / "gpu_bench.json").read_text())["rows"]
    table = (out / "table.txt").read_text()
    for v in ("naive_torch fwd+bwd", "ours fwd+bwd", "ours+entropy fwd+bwd", "ours_gemm fwd+bwd",
              "ours_gemm_cache1G fwd+bwd"):
        r = _ok(rows, "linear_logprobs", v)
        assert r["max_abs_err_vs_naive"] < 1e-4, r  # fp32 in smoke mode: ours agrees with naive
        assert r["tflops"] > 0 and r["frac_peak"] > 0
    assert _ok(rows, "linear_logprobs", "ours fwd+bwd")["speedup_vs_naive"] > 0
    peers = {r["variant"].split()[0] for r in rows if r["op"] == "linear_logprobs"}
    assert {"cce", "cce_exact", "liger"} <= peers, peers  # a row each: measured, or the error why not
    assert _ok(rows, "linear_kl", "ours fwd+bwd")["max_abs_err_vs_naive"] < 1e-4
    for v in ("reference_chained[eager]", "torch_compile[eager]", "ours[eager]"):
        _ok(rows, "policy_loss", v)
    eng = _ok(rows, "rollout_two_turn", "engine")
    hf = _ok(rows, "rollout_two_turn", "hf_generate")
    assert eng["generated"] == 3 * 2 * 2 * 4 and hf["generated"] == eng["generated"]  # EOS off: full budgets
    assert eng["speedup_vs_hf_generate"] > 0 and eng["decode_steps"] > 0 and 0 < eng["frac_peak"]
    step = _ok(rows, "score_step", "step")
    phases = [r for r in rows if r["op"] == "score_step" and r["variant"].startswith("  4: ")]
    names = {r["variant"].strip() for r in phases}
    assert {"4: policy fwd", "4: reference fwd", "4: backward", "4: clip + AdamW", "4: policy_loss"} <= names, names
    parts = sum(_ok(rows, "score_step", v)["ms"] for v in ("1 rollouts", "2-3 rewards+advantages",
                                                           "4 update (train_step)"))
    assert abs(parts - step["ms"]) < 1e-6 * step["ms"] + 1e-6
    assert 0 < step["mfu"]
    for op in ("linear_logprobs", "linear_kl", "policy_loss", "rollout_two_turn", "score_step", "token_kl",
               "paged_attn_decode"):
        assert op in table, op


def test_merge_keeps_a_killed_benchmarks_partial_rows(tmp_path):
    done = tmp_path / "pg.json"
    done.write_text(json.dumps({"device": "X", "peak": {"matmul_bf16_tflops": 1.0}, "rows": [
        {"op": "policy_loss", "shape": "s", "variant": "ours", "ms": 1.0}], "failed": [],
        "benchmarks": {"pg": {"status": "ok"}}}))
    (tmp_path / "pg.jsonl").write_text(json.dumps({"op": "policy_loss", "shape": "s", "variant": "ours", "ms": 1.0}))
    part = tmp_path / "engine.jsonl"  # killed: one whole row, one cut off mid-line
    part.write_text(json.dumps({"op": "rollout_two_turn", "shape": "s", "variant": "engine", "ms": 5.0}) + "\n{\"op\": ")
    res = gpu_bench.merge([str(done), str(tmp_path / "pg.jsonl"), str(part), str(tmp_path / "missing.json")])
    assert [r["variant"] for r in res["rows"]] == ["ours", "engine"]  # pg's partial rows not counted twice
    assert res["failed"] == ["engine"] and "killed" in res["benchmarks"]["engine"]["status"]
    assert res["device"] == "X"
    table = gpu_bench.format_table(res["rows"] + [{"op": "x", "shape": "s", "variant": "v", "error": "boom"}])
    assert "error: boom" in table and "rollout_two_turn" in table


def test_time_budget_skips_instead_of_running(monkeypatch):
    from benchmarks.gpu import bench_linear_kl
    monkeypatch.setattr(gpu_timing, "_CFG", {"device": "cpu", "smoke": True, "deadline": None})
    monkeypatch.setattr(gpu_timing, "_PEAK", {"matmul_bf16_tflops": 1.0, "copy_gbs": 1.0, "device": "cpu"})
    gpu_timing.configure(budget_s=0)
    rows = list(bench_linear_kl.run())
    assert [r["variant"] for r in rows] == ["naive_torch", "ours"]
    assert all(r["error"].startswith("skipped: benchmark time budget") for r in rows), rows


def test_gpu_thresholds_rows_are_null_until_measured():
    with open(os.path.join(ROOT, "benchmarks", "thresholds.yaml")) as f:
        t = yaml.safe_load(f)
    assert set(t["gpu"]) == set(t["cpu"])  # every gated op has its GPU row
    assert all(v is None for lim in t["gpu"].values() for v in lim.values())  # no invented numbers


def test_gate_skips_null_limits(tmp_path):
    th = tmp_path / "thresholds.yaml"
    th.write_text("cpu:\n  token_kl: {time: null, memory: null}\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_bench_token_kl.py", "--perf-gate", "-q",
                        "-rs", "-p", "no:cacheprovider", "--bench-rounds", "1", "--benchmark-disable",
                        "--bench-thresholds", str(th)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300, check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "limits are null in thresholds.yaml" in out, out[-3000:]


def test_engine_cuda_graph_switch_is_found(monkeypatch):
    from benchmarks.gpu.bench_engine import engine_options

    class Graphs:
        def __init__(self, model, tokenizer, *, block_size=16, graph_batch_sizes=(1, 8), cuda_graphs=False):
            pass

    class Eager:
        def __init__(self, model, tokenizer, *, enforce_eager=True):
            pass

    class Neither:
        def __init__(self, model, tokenizer, *, block_size=16):
            pass

    monkeypatch.setattr(gpu_timing, "_CFG", {"device": "cuda", "smoke": False, "deadline": None})
    assert engine_options(Graphs)[0] == {"cuda_graphs": True}  # a boolean switch, not the sizes list
    assert engine_options(Eager)[0] == {"enforce_eager": False}
    kw, note = engine_options(Neither)
    assert kw == {} and "no CUDA-graph option" in note
