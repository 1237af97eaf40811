"""Base-model probe of turn-1 prompts and turn-2 instructions (the levers): greedy two-turn answers of the
embedded SmolLM2-135M on N held-out additions per variant, with the stated-answer split.

    python experiments/self-correction/instruction_probe.py N THREADS VARIANTS.json > OUT.jsonl

VARIANTS.json: [{"name": ..., "instr": turn-2 instruction, "fmt": data.prompt_format (default: the bare "What is {expr}?")}, ...].
Writes samples_<name>.md (20 rows) beside VARIANTS.json. Recorded: records/demo_instruction_probe*.json
(records/demo_instruction_probe_variants.json is a VARIANTS.json).
"""
import json
import os
import sys
import time

import torch

from score_api import (DataConfig, Engine, SamplingParams, load_model, load_records, reward,
                       self_correction_metrics, turn1_stated)

torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 128
model, tok = load_model("embedded")
eng = Engine(model, tok)
vpath = sys.argv[3]
variants = json.load(open(vpath))
here = os.path.dirname(os.path.abspath(vpath))
for v in variants:
    dc = DataConfig(task="arithmetic", digits=v.get("digits", 2), prompt_format=v.get("fmt", "What is {expr}?"),
                    n_operands=v.get("n_operands", 2), ops=v.get("ops", ["+"]))
    recs = load_records(dc, "eval", n)
    t0 = time.time()
    ss = eng.generate([r.problem for r in recs], SamplingParams(n=1, temperature=0.0, max_new_tokens=128),
                      instruction=v["instr"])
    r1 = [reward("arithmetic", s.turn1_text, r) for s, r in zip(ss, recs)]
    r2 = [reward("arithmetic", s.turn2_text, r) for s, r in zip(ss, recs)]
    st = [turn1_stated("arithmetic", s.turn1_text, s.finish_reasons[0]) for s in ss]
    m = self_correction_metrics(r1, r2, st, cut_t1=[s.finish_reasons[0] == "length" for s in ss],
                                  cut_t2=[s.finish_reasons[1] == "length" for s in ss])
    print(json.dumps({"name": v["name"], "s": round(time.time() - t0), **{k: (round(m[k], 3) if isinstance(m[k], float) else m[k]) for k in
          ("acc_t1", "acc_t2", "delta_stated", "n_i2c_stated", "n_c2i_stated", "n_i2c_unstated", "cut_t1", "cut_t2")}}), flush=True)
    with open(os.path.join(here, f"samples_{v['name']}.md"), "w") as f:
        for s, r, a, b in list(zip(ss, recs, r1, r2))[:20]:
            f.write(f"## {r.problem} = {r.answer}  r1={a} r2={b}\nY1: {s.turn1_text!r}\nY2: {s.turn2_text!r}\n\n")
