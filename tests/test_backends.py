import pytest
import torch

import score_kernels
from score_kernels._backend import pick_backend


def test_backends_report():
    b = score_kernels.backends()
    assert set(b) == {"triton", "cuda", "cpu", "torch"}
    assert b["torch"] is True
    if not torch.cuda.is_available():
        assert b["cuda"] is False


def test_default_pick_on_cpu_prefers_cpu_ext():
    b = pick_backend(None, torch.device("cpu"), supported=("triton", "cuda", "cpu", "torch"),
                     ext_ops=("token_kl_fwd",))
    assert b == ("cpu" if score_kernels.backends()["cpu"] else "torch")


def test_forcing_a_dead_backend_raises():
    with pytest.raises(ValueError, match="backend"):
        pick_backend("cuda", torch.device("cpu"), supported=("cuda", "torch"))
    with pytest.raises(ValueError, match="backend"):
        pick_backend("bogus", torch.device("cpu"), supported=("torch",))


def test_package_works_without_extension(tmp_path):
    import subprocess
    import sys
    code = ("import torch, score_kernels as sk; b = sk.backends(); assert not b['cpu'], b;"
            "x = torch.randn(5, requires_grad=True); sk.token_kl(x, torch.randn(5)).sum().backward();"
            "print('ok')")
    res = subprocess.run([sys.executable, "-c", code], env={**__import__('os').environ, "SCORE_NO_EXT": "1"},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_missing_extension_says_so_once(tmp_path):
    # an install whose build had no compiler: importing _C fails; the package still works and says why, once
    import subprocess
    import sys
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'score_kernels._C': raise ImportError('no _C in this install')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import torch, score_kernels as sk\n"
            "import score_kernels._backend\n"
            "assert not sk.backends()['cpu']\n"
            "x = torch.randn(5, requires_grad=True); sk.token_kl(x, torch.randn(5)).sum().backward(); print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
    assert res.stderr.count("compiled extension is not available") == 1, res.stderr[-2000:]
    assert "no _C in this install" in res.stderr
