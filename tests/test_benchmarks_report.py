"""benchmarks/report.py reads every format benchmarks/cpu_engine.py has written: the old top-level
{engine, hf_generate} summary and the per-round records (the round of median speed-up), with the sampling
dtypes in the shape so that fp32 and bf16 pairs are separate rows."""
import json

from benchmarks.report import read_gpu


def _side(tps):
    return {"tokens_per_s": tps}


def test_engine_rounds_record_gives_the_median_round(tmp_path):
    cfg = {"model": "M", "prompts": 32, "n": 4, "max_new_tokens_per_turn": 96, "threads": 1, "cpus": 2,
           "time": "2026-12-03 14:36:26", "engine_compute_dtype": "bfloat16", "hf_dtype": "bfloat16",
           "machine": "2 cores (Xeon; AMX-BF16), load average at start 1.0, 1.0 at the end"}
    rounds = [{"engine": _side(e), "hf_generate": _side(h)} for e, h in ((300.0, 100.0), (200.0, 100.0), (250.0, 100.0))]
    p = tmp_path / "cpu_engine_bf16.json"
    p.write_text(json.dumps({"rounds": rounds, "config": cfg}))
    (row,) = read_gpu(str(p))
    assert row["op"] == "engine (two-turn rollout)" and row["kind"] == "cpu"
    assert abs(row["time_ratio"] - 100.0 / 250.0) < 1e-12  # the middle of 2.0x, 2.5x, 3.0x
    assert "engine bfloat16 vs HF bfloat16" in row["shape"]
    assert row["machine"] == "2 cores (Xeon; AMX-BF16), 1 thread(s)"


def test_engine_summary_record_still_reads(tmp_path):
    p = tmp_path / "cpu_engine.json"
    p.write_text(json.dumps({"engine": _side(44.0), "hf_generate": _side(29.0),
                             "config": {"prompts": 32, "n": 4, "cpus": 2, "threads": 1}}))
    (row,) = read_gpu(str(p))
    assert abs(row["time_ratio"] - 29.0 / 44.0) < 1e-12 and row["machine"] == "2 cores, 1 thread(s)"
    assert "vs HF" not in row["shape"]
    (tmp_path / "not_a_record.json").write_text("[1, 2]")
    assert read_gpu(str(tmp_path / "not_a_record.json")) == []
