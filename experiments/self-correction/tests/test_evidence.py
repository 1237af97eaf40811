"""The evidence protocol (evidence.py, evidence.yaml): every job is a command the product accepts, with the dev
split on every run, one look at the eval split per model, and the table's trained-minus-base arithmetic."""
import json

import evidence as ev
import score_api as api
from score_train.commands.eval import parse_args as parse_eval
from score_train.commands.train import parse_args as parse_train


def test_every_training_run_chooses_on_dev_and_trains_without_it():
    for r in ev.P["runs"]:
        cmd = ev.train_cmd(r)
        cfg = api.load_config(None, cmd[3:])
        assert cfg.data.dev_fraction == 0.1 and cfg.eval.split == "dev" and not cfg.eval.before
        assert (cfg.algo.name, cfg.run.seed) == (r["algo"], r["seed"])
        assert cfg.rollout.instruction == ev.P["text"]["instruction"]
        assert cfg.rollout.reply_prefix == ev.P["text"]["reply_prefix"]


def test_each_model_reads_the_eval_split_under_its_training_text_and_the_variants_change_one_thing(tmp_path, monkeypatch):
    out = tmp_path / "runs" / "evidence"  # a fresh checkout has no runs/: evidence.py run makes it
    out.mkdir(parents=True)
    monkeypatch.setattr(ev, "OUT", str(out))
    seen = {}
    for v in ev.P["variants"]:
        cfg, _ = parse_eval(ev.eval_cmd("evidence_score_seed0", v)[3:])
        seen[v] = cfg
        assert cfg.model.spec.endswith("runs/evidence/evidence_score_seed0/final_model")
    own, task, small, worded = (seen[k] for k in ("own", "task_instruction", "two_plus_one", "reworded"))
    assert own.evaluate.split == "eval" and own.data.eval_size >= 784
    assert own.rollout.instruction == ev.P["text"]["instruction"]
    assert (task.rollout.instruction, task.rollout.reply_prefix, task.evaluate.split) == ("", "", "eval")
    assert small.data.operand_digits == [2, 1] and small.evaluate.split == "all"
    assert "{a}" in worded.data.prompt_format and worded.data.prompt_format != own.data.prompt_format
    assert all(c.data.eval_size >= 512 for c in seen.values())
    assert ev.eval_cmd("embedded", "own")[3] == "--model=embedded"


def test_table_subtracts_the_base_models_delta_under_the_same_variant(tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "RECORDS", str(tmp_path))
    m = {"acc_t1": 0.2, "acc_t2": 0.25, "delta_stated": 0.045, "n_stated": 760, "n": 784, "n_i2c_stated": 25,
         "n_c2i_stated": 3, "cut_t1": 0.03, "cut_t2": 0.0}
    for model, d in (("embedded", 0.045), ("evidence_score_seed0", 0.08)):
        with open(tmp_path / f"evidence_eval_{model}_own.json", "w") as f:
            json.dump({"metrics": dict(m, delta_stated=d)}, f)
    text = ev.table()
    assert "| evidence_score_seed0 | 20.0 | 25.0 | +8.0 (760 of 784) | +3.5 | 25 / 3 |" in text
    assert "| evidence_score_seed1 | not measured" in text
    row = next(x for x in text.splitlines() if x.startswith("| own | "))
    assert row.startswith("| own | 20.0 / 3.0% (met) |")
    assert "| +3.5 (1 of 3): mean +3.5 | 25.0 | not measured |" in row  # 15 + 5 + 15 + 5: seed 0 only


def test_schedule_is_chosen_on_dev_by_the_written_rule(tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "RECORDS", str(tmp_path))
    cands = {}
    for r in ev.P["runs"]:
        if "schedule" in r:
            cands.setdefault(r["schedule"], []).append(r["name"])
    assert {"15 + 5 + 15 + 5", "30 + 10", "20 + 20"} <= set(cands) and all(len(v) == 3 for v in cands.values())
    assert all(r["algo"] == "score" for r in ev.P["runs"] if "schedule" in r)

    def write(run, delta, acc_t2):
        with open(tmp_path / f"evidence_{run}.json", "w") as f:
            json.dump({"evals": [{"tag": "after", "delta_stated": delta, "acc_t2": acc_t2, "acc_t1": 0.3,
                                  "n_stated": 500, "n_i2c_stated": 9, "n_c2i_stated": 3, "cut_t1": 0.01}]}, f)

    names = list(cands)
    for i, k in enumerate(names):
        for run in cands[k][:2]:
            write(run, 0.01 * i, 0.3)
    assert ev.choose()[0] is None  # a seed missing: no choice yet
    for i, k in enumerate(names):
        write(cands[k][2], 0.01 * i, 0.3)
    assert ev.choose()[0] == names[-1]  # the highest mean delta among stated
    write(cands[names[-2]][0], 0.01 * (len(names) - 2) + 0.02, 0.6)  # mean delta within the tie, higher Acc@t2
    chosen, means = ev.choose()
    assert chosen == names[-2] and means[names[-2]][2] == 3
    assert "Section 1's choice (evidence.yaml `selection`, dev numbers only): **" + names[-2] + "**" in ev.table()


def test_base_only_variants_and_extra_training_flags_reach_the_commands():
    jobs = ev.jobs()
    assert "eval:embedded:dev" in jobs and not any(j.startswith("eval:evidence_score_seed0:dev") for j in jobs)
    total = {}
    for r in ev.P["runs"]:
        cfg, _ = parse_train(ev.train_cmd(r)[3:])  # as score-train reads it: the demo preset under the flags
        steps = cfg.algo.stage1_steps + cfg.algo.stage2_steps if r["algo"] == "score" else cfg.algo.steps
        total.setdefault(r["name"].startswith("evidence_long_"), set()).add(steps)
        assert cfg.data.dev_fraction == 0.1
        if r.get("schedule") == "20 + 20":
            assert (cfg.algo.stage1_steps, cfg.algo.stage2_steps, cfg.algo.interleave) == (20, 20, 1)
        elif r.get("schedule") == "15 + 5 + 15 + 5":
            assert (cfg.algo.stage1_steps, cfg.algo.stage2_steps, cfg.algo.interleave) == (30, 10, 2)
        elif r.get("schedule") == "30 + 10" or r["name"].startswith("evidence_lever_"):
            # a lever changes one thing against the demo's 30 + 10, never the schedule
            assert (cfg.algo.stage1_steps, cfg.algo.stage2_steps, cfg.algo.interleave) == (30, 10, 1)
    # the candidates, the levers and multi-turn-rl at the demo's 40 steps; the longer benchmark's runs at equal steps
    assert total[False] == {40} and len(total[True]) == 1 and min(total[True]) > 40
    assert {r["algo"] for r in ev.P["runs"] if r["name"].startswith("evidence_long_")} == {"score", "multi-turn-rl"}
    assert all("label" in r for r in ev.P["runs"] if r["name"].startswith(("evidence_long_", "evidence_lever_")))


def test_the_demo_preset_trains_what_dev_chose():
    # README's demo rows are the chosen schedule's evidence runs: `score-train --run.seed=S` must train exactly
    # those (model, data, schedule, rollout, optimiser), so a preset change needs new records, not a stale table.
    from dataclasses import asdict
    chosen, _ = ev.choose()  # from the committed dev records
    assert chosen is not None
    for r in ev.P["runs"]:
        if r.get("schedule") == chosen:
            got = asdict(parse_train(ev.train_cmd(r)[3:])[0])
            want = asdict(parse_train([f"--run.seed={r['seed']}"])[0])
            for section in ("model", "data", "algo", "rollout", "optim"):
                assert got[section] == want[section], (r["name"], section)


def test_a_record_keeps_the_commit_its_job_ran_at(tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "OUT", str(tmp_path))
    monkeypatch.setattr(ev, "RECORDS", str(tmp_path))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "wall.jsonl").write_text(
        json.dumps({"job": "eval:embedded:own", "wall_s": 1.0, "commit": "abc1234", "machine": "m1"}) + "\n"
        + json.dumps({"job": "eval:embedded:dev", "wall_s": 1.0}) + "\n")
    (tmp_path / "evidence_eval_embedded_dev.json").write_text(json.dumps({"commit": "old5678", "machine": "m0"}))
    assert ev.ran_at("eval:embedded:own", "evidence_eval_embedded_own") == {"commit": "abc1234", "machine": "m1"}
    assert ev.ran_at("eval:embedded:dev", "evidence_eval_embedded_dev") == {"commit": "old5678", "machine": "m0"}


def test_a_rerun_that_trained_another_model_never_replaces_the_record_choices_were_made_on(tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "RECORDS", str(tmp_path))
    dev = [{"tag": "after", "delta_stated": 0.098, "acc_t2": 0.39}]
    with open(tmp_path / "evidence_evidence_s30+10_seed0.json", "w") as f:
        json.dump({"evals": dev, "machine": "AVX512-BF16"}, f)  # recorded before records kept a digest
    other = {"evals": [dict(dev[0], delta_stated=0.05)], "model_digest": "0123456789ab"}
    assert ev.record_name("evidence_s30+10_seed0", other) == "evidence_evidence_s30+10_seed0_rerun"
    same = {"evals": [dict(dev[0], eval_s=376.3)], "model_digest": "0123456789ab"}  # slower, the same figures
    assert ev.record_name("evidence_s30+10_seed0", same) == "evidence_evidence_s30+10_seed0"
    assert ev.record_name("evidence_s30+10_seed1", other) == "evidence_evidence_s30+10_seed1"  # no record yet


def test_digest_names_the_weights_an_evaluation_read(tmp_path):
    assert ev.digest(str(tmp_path / "missing")) is None
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    first = ev.digest(str(tmp_path))
    assert len(first) == 12
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    assert ev.digest(str(tmp_path)) != first


def test_collect_keeps_the_first_run_and_lists_a_reproduction(tmp_path, monkeypatch):
    records, out = tmp_path / "records", tmp_path / "runs"
    records.mkdir()
    monkeypatch.setattr(ev, "RECORDS", str(records))
    monkeypatch.setattr(ev, "OUT", str(out))
    run = ev.P["runs"][0]["name"]
    dev = [{"tag": "after", "delta_stated": 0.05, "acc_t2": 0.4}]
    first = {"run": run, "evals": [dict(dev[0], eval_s=250.0)], "machine": "AVX512-BF16", "commit": "aaa",
             "wall_s": 1500.0}
    (records / f"evidence_{run}.json").write_text(json.dumps(first))
    d = out / run
    (d / "final_model").mkdir(parents=True)
    (d / "final_model" / "model.safetensors").write_bytes(b"rerun weights")
    (d / "summary.json").write_text(json.dumps({"evals": [dict(dev[0], eval_s=400.0)], "wall_s": 2400.0}))
    for name in ("config.yaml", "metrics.jsonl", "eval_after_rows.jsonl"):
        (d / name).write_text("")
    ev.collect()
    got = json.loads((records / f"evidence_{run}.json").read_text())
    assert (got["machine"], got["wall_s"], got["evals"]) == ("AVX512-BF16", 1500.0, first["evals"])
    assert [x["wall_s"] for x in got["reproduced"]] == [2400.0]
    ev.collect()  # collecting again lists the same reproduction once
    assert len(json.loads((records / f"evidence_{run}.json").read_text())["reproduced"]) == 1
    assert not (records / f"evidence_{run}_rerun.json").exists()
