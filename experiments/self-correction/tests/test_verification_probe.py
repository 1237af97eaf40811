"""verification_probe.py: the AUC, the yes/no margin and the order-effect counts it reports."""
import math

import pytest
import score_api as api
import torch
import verification_probe as vp

from tests.helpers import save_tiny_llama


def test_auc_counts_pairs_and_ties():
    assert vp.auc([3.0, 2.0], [1.0, 0.0]) == 1.0
    assert vp.auc([0.0], [1.0]) == 0.0
    assert vp.auc([1.0, 0.0], [1.0]) == 0.25  # a tie counts half, a loss nothing
    assert math.isnan(vp.auc([], [1.0]))


def test_off_by_and_flips():
    assert vp.off_by(57, "a") in (47, 67) and vp.off_by(7, "a") in (6, 8)
    assert vp.off_by(57, "x") == vp.off_by(57, "x")  # fixed by the text, not drawn
    assert vp.flips([0, 1, 1, 0], [1, 0, 1, 0]) == {"i2c": 1, "c2i": 1}
    rec = api.arithmetic.generate(1)[0]
    assert rec.problem == f"What is {vp.expression(rec)}? Answer with just the number."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return api.load_model(save_tiny_llama(tmp_path_factory.mktemp("tiny")))


def test_yes_no_margins_are_the_log_odds_of_the_first_reply_token_batched_or_not(tiny):
    model, tok = tiny
    yes, no = vp.one_token_ids(tok, ["Yes", "yes"]), vp.one_token_ids(tok, ["No", "no"])
    assert yes and no and not set(yes) & set(no)
    assert all(tok.decode([i]).strip().lower() in ("yes", "no") for i in yes + no)
    convs = [[{"role": "user", "content": q}] for q in ("Is 2 + 2 = 4? Answer yes or no.", "Is 13 = 14?",
                                                         "Is 37 + 45 + 12 = 94? Answer yes or no, and be quick.")]
    want = []
    for msgs in convs:  # by hand: one unpadded sequence at a time, its last row
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        with torch.no_grad():
            h = model(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
            lp = torch.log_softmax(model.logits(h[0, -1]), -1)
        want.append((torch.logsumexp(lp[yes], 0) - torch.logsumexp(lp[no], 0)).item())
    # batch=2: a left-padded pair (different lengths) and a lone one
    assert vp.yes_no_margins(model, tok, convs, yes, no, batch=2) == pytest.approx(want, abs=1e-5)


def test_probe_task_runs_end_to_end_and_reports_the_order_effect(tiny):
    model, tok = tiny
    out = vp.probe_task(model, tok, api.Engine(model, tok), {}, 6)
    assert out["n"] == 6 and 0.0 <= out["acc_t1"] <= 1.0 and 0.0 <= out["p_yes_own"] <= 1.0
    for k in ("own_answer_auc", "true_vs_off_auc", "confidence_mean_auc", "confidence_min_auc"):
        assert math.isnan(out[k]) or 0.0 <= out[k] <= 1.0  # nan: the random model got none (or all) right
    assert not math.isnan(out["true_vs_off_auc"])  # both sides asked of every problem
    assert set(out["orders"]) == set(vp.ORDERS)
    for name, o in out["orders"].items():  # flips against the question's order add up to the accuracy change
        if name != "question's order":
            assert o["i2c"] - o["c2i"] == round(6 * (o["acc"] - out["orders"]["question's order"]["acc"]))
    assert len(out["samples"]) == 6 and all(s["right"] in (0.0, 1.0) for s in out["samples"])


def test_explore_counts_sampled_turns_2_per_instruction(tiny):
    model, tok = tiny
    got = vp.explore(api.Engine(model, tok), 2, {"a": "Check it.", "b": "Check it again."}, samples=2)
    assert set(got) == {"a", "b"}
    for o in got.values():
        assert o["samples"] == 4 and 0 <= o["other_order_right"] <= o["other_order"] <= 4
        assert 0.0 <= o["r1"] <= 1.0 and 0.0 <= o["r2"] <= 1.0


def test_eval_split_size_is_what_the_data_module_can_draw():
    DataConfig, load_records = api.DataConfig, api.load_records
    cfg = DataConfig(task="arithmetic", digits=1, n_operands=3, ops=["+", "*"])
    n = vp.eval_split_size(cfg)
    assert len(load_records(cfg, "eval", n)) == n
    assert len(load_records(cfg, "eval", n + 1)) == n  # more than the split: all of it, and no more
    assert vp.eval_split_size(DataConfig(task="arithmetic", digits=3, n_operands=3)) == 10**9  # not listed
