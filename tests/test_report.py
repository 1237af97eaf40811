"""report.md from a run's files: the evaluation table shows the truncation and the stated-answer split,
with delta among stated answers as the headline."""
import json

import pytest

from score_train.eval import self_correction_metrics, truncation_warning

pytest.importorskip("matplotlib")


def _eval(tag, step, r1, r2, stated, cut1, max_new):
    m = self_correction_metrics(r1, r2, stated, cut_t1=cut1, cut_t2=[False] * len(r1)) | {"max_new_tokens": max_new}
    e = dict(m, tag=tag, step=step, num_problems=len(r1), edit_distance_ratios=[0.5] * len(r1))
    w = truncation_warning(e) if tag == "before" else None  # as evaluate_run: the base model's evaluation
    if w:
        e["warning"] = w
    return e


def test_report_shows_the_stated_split_and_truncation(tmp_path):
    from score_train.report import write_report

    # before: 8 of 10 turn-1 answers cut; after: turn 2 "corrects" 4 cut-off answers and 1 stated one
    before = _eval("before", 0, [0] * 10, [0] * 10, [i >= 8 for i in range(10)], [i < 8 for i in range(10)], 32)
    after = _eval("after", 4, [0, 0, 0, 0, 0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                  [False] * 4 + [True] * 6, [True] * 4 + [False] * 6, 32)
    for e in (before, after):
        (tmp_path / f"eval_{e['tag']}.json").write_text(json.dumps(e))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "stage": "stage1", "reward_t1": 0.1}) + "\n")
    text = open(write_report(str(tmp_path))).read()
    assert "| delta among stated answers |" in text and "| i->c stated | i->c cut/none |" in text
    assert "| cut@t1 | cut@t2 |" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| after |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # delta among the 6 stated: right at t1 {5, 6}, right at t2 {4, 5, 6} -> +1/6; all ten: +50
    assert cells[3] == "**+16.7** (6/10)" and cells[6] == "50.0"
    assert cells[8:10] == ["1", "4"] and cells[11] == "40.0" and cells[13] == "32"
    row = next(ln for ln in text.splitlines() if ln.startswith("| before |"))
    assert [c.strip() for c in row.strip("|").split("|")][11] == "80.0"
    assert "**Warning (before):**" in text and "--eval.max_new_tokens" in text
    assert "Warning (after)" not in text
    assert "delta among stated answers** (the headline)" in text


def test_report_reads_old_eval_files(tmp_path):
    # an eval file written before the split existed still reports (empty cells for what it lacks)
    from score_train.report import write_report

    old = {"tag": "after", "step": 2, "num_problems": 4, "n": 4, "acc_t1": 0.25, "acc_t2": 0.5, "delta": 0.25,
           "delta_i2c": 0.25, "delta_c2i": 0.0}
    (tmp_path / "eval_after.json").write_text(json.dumps(old))
    text = open(write_report(str(tmp_path))).read()
    row = next(ln for ln in text.splitlines() if ln.startswith("| after |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "" and cells[4:7] == ["25.0", "50.0", "25.0"] and cells[11] == ""
