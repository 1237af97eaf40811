"""The AOT compile check runs for sm_80 and sm_90 without a GPU, and dots become tensor-core ops."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compile_check_all_kernels(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    res = subprocess.run([sys.executable, "-m", "score_kernels.compile_check", "--arch", "sm_80,sm_90",
                          "--max-spill", "0", "--json", str(out)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert rows and all(r["ok"] for r in rows)
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    dots = [r for r in rows if r.get("expects_dot")]
    for r in dots:
        assert r["tensor_cores"], r
        # compiled with the JIT's divisibility hints, the K loop must be software-pipelined (cp.async)
        assert r["pipelined"], r
    # no kernel spills registers on either arch (--max-spill 0), and ptxas reported every kernel
    assert all("registers" in r and r["spill_bytes"] == 0 for r in rows), [r for r in rows if r.get("spill_bytes")]
    assert "kernel" in res.stdout and "compiled" in res.stdout


def test_jobs_give_the_rows_of_one_process(tmp_path):
    """--jobs splits the pairs over child processes; the merged rows are the single process's, in order."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    got = {}
    for jobs in (1, 3):
        out = tmp_path / f"j{jobs}.json"
        res = subprocess.run([sys.executable, "-m", "score_kernels.compile_check", "--arch", "sm_80,sm_90",
                              "--filter", "token_kl", "--jobs", str(jobs), "--json", str(out)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        got[jobs] = [(r["kernel"], r["arch"], r["ok"], r.get("registers")) for r in json.loads(out.read_text())]
    assert len(got[1]) >= 3 and got[3] == got[1]
    res = subprocess.run([sys.executable, "-m", "score_kernels.compile_check", "--jobs", "0"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--jobs must be >= 1" in res.stderr


def test_compile_check_fails_on_broken_kernel(tmp_path):
    # a kernel that cannot compile (shape mismatch in tl.store) must make the check exit non-zero
    script = tmp_path / "broken.py"
    script.write_text(
        "import sys, triton, triton.language as tl\n"
        "from score_kernels import _aot, compile_check\n"
        "@triton.jit\n"
        "def bad(x_ptr, B: tl.constexpr):\n"
        "    tl.store(x_ptr + tl.arange(0, B), tl.zeros((B, B), tl.float32))\n"
        "_aot.SPECS[:] = []\n"
        "_aot.register('bad', bad, {'x_ptr': '*fp32', 'B': 'constexpr'}, {'B': 16})\n"
        "import score_kernels\n"
        "rows = compile_check.run(['sm_90'])\n"
        "rows = [r for r in rows if r['kernel'] == 'bad']\n"
        "sys.exit(0 if rows and not rows[0]['ok'] else 3)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_divisibility_hints_follow_the_jit():
    # pointers and stride* integers always; extra names add to them; constexprs are refused
    import pytest

    from score_kernels import _aot
    from score_kernels._vocab_tiles import fwd_kernel

    spec = next(s for s in _aot.SPECS if s.name.startswith("linear_logprobs_fwd[bf16,lp,ent"))
    names = list(spec.kernel.arg_names)
    marked = {names[k[0]] for k in spec.attrs()}
    assert {"h_ptr", "w_ptr", "stride_h", "stride_w", "D", "RD"} <= marked
    assert not {"N", "V", "inv_t", "v_per_split"} & marked
    bad = _aot.AOTSpec("x", fwd_kernel, dict(spec.signature), dict(spec.constexprs), extra_divisible=("BN",))
    with pytest.raises(ValueError, match="BN"):
        bad.attrs()
