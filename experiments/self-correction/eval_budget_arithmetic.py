"""Turn-1 token budget for arithmetic: how many greedy turn-1 answers of the embedded
SmolLM2-135M end on EOS within B new tokens, on eval-split problems, with the paged engine.

    python experiments/self-correction/eval_budget_arithmetic.py OUT.json [N_PROBLEMS=256] [MAX_TOKENS=192] [THREADS=1] [PROMPT_FORMAT=the task's default]

One greedy generation at MAX_TOKENS; the greedy answer at a budget B <= MAX_TOKENS is its first B tokens.
Also writes the model load's cProfile (top 25 by cumulative time) to OUT.json's "load_profile_top".
"""
import cProfile, json, platform, pstats, sys, time, io
t0 = time.perf_counter()
import torch
torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 1)
from score_api import ArithmeticConfig, Engine, SamplingParams, arithmetic, load_model, load_task, reward, \
    stated_answer, turn1_message
DEFAULT_FORMAT = arithmetic.DEFAULT_FORMAT
t_imp = time.perf_counter() - t0
pr = cProfile.Profile(); pr.enable()
t1 = time.perf_counter()
m, tok = load_model("embedded", dtype=torch.float32, device="cpu")
t_load = time.perf_counter() - t1
pr.disable()
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(25)
load_profile = s.getvalue().splitlines()[:40]
print(f"imports {t_imp:.1f}s load {t_load:.1f}s", flush=True)
N = int(sys.argv[2]) if len(sys.argv) > 2 else 256
PROMPT = sys.argv[5] if len(sys.argv) > 5 else DEFAULT_FORMAT
recs = load_task("arithmetic", "eval", N, 0, arithmetic=ArithmeticConfig(digits=2, prompt_format=PROMPT))
eng = Engine(m, tok)
MAX = int(sys.argv[3]) if len(sys.argv) > 3 else 192
t2 = time.perf_counter()
ss = eng.generate([turn1_message(r, "plain") for r in recs], SamplingParams(n=1, temperature=0.0, max_new_tokens=MAX),
                  two_turn=False)
t_gen = time.perf_counter() - t2
print(f"generate {t_gen:.1f}s", flush=True)
rows = [{"id": recs[s.prompt_index].id, "tokens": len(s.turn1_ids), "finish": s.finish_reasons[0]} for s in ss]
budgets = {}
for B in sorted({32, 64, 96, 128, 160, 192, MAX}):
    if B > MAX:
        continue
    # greedy: the answer at budget B is the first B tokens of the answer at MAX
    eos = sum(1 for r in rows if r["finish"] in ("eos", "stop") and r["tokens"] <= B)
    budgets[str(B)] = {"ended_on_eos": eos, "cut": len(rows) - eos, "frac_eos": eos / len(rows)}
at = {}
for B in (128, MAX):
    texts = [tok.decode(s.turn1_ids[:B], skip_special_tokens=True) for s in ss]
    fin = [r["finish"] if r["tokens"] <= B else "length" for r in rows]
    right = [reward("arithmetic", t, recs[s.prompt_index]) for t, s in zip(texts, ss)]
    stated = [f in ("eos", "stop") and stated_answer("arithmetic", t) is not None for t, f in zip(texts, fin)]
    at[str(B)] = {"acc_t1": sum(right) / len(rows), "n_stated": sum(stated)}
out = {"what": "greedy turn-1 answers of the base model that end on EOS within B new tokens",
       "model": "embedded SmolLM2-135M-Instruct (GGUF Q4_1 de-quantised to float32)", "rollout": "paged engine",
       "task": f"arithmetic, eval split, seed 0, 2 digits, 2 operands, '+', prompt {PROMPT!r}, plain style",
       "n_problems": len(rows), "generated_at_max_new_tokens": MAX,
       "method": f"one greedy generation at {MAX} tokens; the greedy answer at budget B is its first B tokens",
       "budgets": budgets, "turn1_at_budget": at,
       "length_tokens": {"max_eos": max((r["tokens"] for r in rows if r["finish"] == "eos"), default=None),
                         "mean": sum(r["tokens"] for r in rows) / len(rows)},
       "timing_s": {"imports": round(t_imp, 1), "model_load": round(t_load, 1), "generate": round(t_gen, 1)},
       "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                  f"torch {torch.__version__}, shared with other jobs (load average ~15)",
       "load_profile_top": load_profile, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "samples": rows}
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(json.dumps(budgets), flush=True)
