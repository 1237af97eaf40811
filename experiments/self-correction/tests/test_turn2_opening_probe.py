"""turn2_opening_probe.py: a turn 2 after a shared turn 1 is the two-turn engine's own turn 2, and the
candidate's metrics are the evaluation's."""
import pytest
import score_api as api
import turn2_opening_probe as tp

from tests.helpers import save_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return api.load_model(save_tiny_llama(tmp_path_factory.mktemp("tiny")))


@pytest.mark.parametrize("instruction, opening", [("Solve it again.", ""), ("Solve it again.", "Let me see: ")])
def test_turn2_after_a_shared_turn1_is_the_engines_two_turn_sample(tiny, instruction, opening):
    model, tok = tiny
    recs = api.arithmetic.generate(5)
    prompts = [r.problem for r in recs]
    eng = api.Engine(model, tok)
    greedy = api.SamplingParams(n=1, temperature=0.0, max_new_tokens=6)
    turn1 = eng.generate(prompts, greedy, two_turn=False)
    turn2 = tp.turn2_after(eng, turn1, prompts, instruction, opening, 6)
    both = eng.generate(prompts, greedy, instruction=instruction, reply_prefix=opening)
    assert [s.turn1_ids for s in turn2] == [s.turn2_ids for s in both]
    assert [s.turn1_ids for s in turn1] == [s.turn1_ids for s in both]
    m = tp.candidate_metrics("arithmetic", recs, turn1, turn2)["metrics"]
    sampling = api.SamplingConfig(max_new_tokens=6, instruction=instruction, reply_prefix=opening)
    want = api.evaluate(eng, recs, sampling)["greedy"]["metrics"]
    assert {k: m[k] for k in m} == {k: want[k] for k in m}
