"""score-rl as users install it: `python -m build` makes an sdist and a wheel with clean metadata; each
installs into a fresh venv (no --system-site-packages) holding only a CPU torch, and `import score_kernels`
works there. From the wheel built with a compiler the extension loads; from the sdist built with no usable
compiler the install still succeeds, prints one line, and the ops run on their torch paths.

Installing torch into a new venv takes about 3 minutes here (191 s measured: unpacking ~800 MB), so the
fresh venv gets torch and its dependencies linked from the running interpreter's installation instead: the
same files a `pip install torch==<this version>` would unpack, seen by pip in that venv as installed."""
import email
import os
import subprocess
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout + p.stderr


def _requirement_names(dist):
    """Runtime requirements that apply here; the venv keeps its own build tools (pip, setuptools)."""
    from packaging.requirements import Requirement

    names = []
    for r in map(Requirement, dist.requires or []):
        if r.marker is not None and not r.marker.evaluate({"extra": ""}):
            continue
        if r.name.lower() not in ("pip", "setuptools", "wheel"):
            names.append(r.name)
    return names


def _link_torch(site: Path):
    """Symlinks torch's installed files (and its dependencies', recursively) into a venv's site-packages."""
    seen, todo = set(), ["torch"]
    while todo:
        name = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if dist.metadata["Name"].lower() in seen:
            continue
        seen.add(dist.metadata["Name"].lower())
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            src = Path(dist.locate_file(top))
            dst = site / top
            if src.exists() and not dst.exists() and not top.startswith("__pycache__"):
                dst.symlink_to(src)
        todo += _requirement_names(dist)
    return seen


def _venv(path: Path):
    _run([sys.executable, "-m", "venv", str(path)])
    py = path / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    _link_torch(site)
    return py


IMPORT_CHECK = """
import torch, score_kernels
from score_kernels import token_kl
lp, ref = torch.randn(5, 7), torch.randn(5, 7)
out = token_kl(lp, ref, "k3")
torch.testing.assert_close(out, torch.exp(ref - lp) - (ref - lp) - 1, rtol=1e-5, atol=1e-6)
print("BACKENDS", score_kernels.backends(), score_kernels.__file__)
"""


def _check_import(py, cwd):
    out = _run([str(py), "-c", IMPORT_CHECK], cwd=cwd)
    line = [x for x in out.splitlines() if x.startswith("BACKENDS")][-1]
    assert "site-packages" in line, line  # the installed copy, not the checkout
    return line


def test_metadata_is_clean():
    """The SPDX license string (no deprecated table), license file, classifiers and extras; setuptools
    reads pyproject.toml without a deprecation warning."""
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == "Apache-2.0" and meta["license-files"] == ["LICENSE"]
    assert any(c.startswith("Programming Language :: Python :: 3") for c in meta["classifiers"])
    assert not any(c.startswith("License ::") for c in meta["classifiers"])  # superseded by the SPDX string
    assert {"dev", "gguf", "eval", "plots", "peers"} <= set(meta["optional-dependencies"])
    apply = ("from setuptools.dist import Distribution\n"
             "from setuptools.config.pyprojecttoml import apply_configuration\n"
             "apply_configuration(Distribution(), 'pyproject.toml')")
    out = _run([sys.executable, "-W", "always", "-c", apply], cwd=ROOT)
    assert "Deprecat" not in out and "license" not in out.lower(), out


@pytest.mark.slow
def test_sdist_and_wheel_install_in_a_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    env = {**os.environ, "SCORE_NO_EXT": "0"}
    out = _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(dist), str(ROOT)],
               env=env)
    assert "SetuptoolsDeprecationWarning" not in out, out[-3000:]
    (sdist,) = dist.glob("score_rl-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    for must in ("csrc/module.cpp", "csrc/common/kl_math.h", "LICENSE", "score_kernels/integrations.py",
                 "score_train/configs"):
        assert any(n.split("/", 1)[1].startswith(must) for n in names if "/" in n), must

    # The wheel from the sdist (what `pip install score-rl` does with a compiler): compiles the CPU extension
    out = _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(dist), str(sdist)],
               env={**env, "MAX_JOBS": "2"})
    (wheel,) = dist.glob("score_rl-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert any(n.startswith("score_kernels/_C") and n.endswith(".so") for n in z.namelist())
        info = email.message_from_bytes(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))))
    assert info["License-Expression"] == "Apache-2.0"
    assert "LICENSE" in info.get_all("License-File")
    assert "peers" in info.get_all("Provides-Extra")

    py = _venv(tmp_path / "venv")
    work = tmp_path / "elsewhere"  # not the checkout, so the import finds the installed package
    work.mkdir()
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)])
    line = _check_import(py, work)
    assert "'cpu': True" in line, line  # the compiled CPU kernels loaded

    # The sdist where no compiler works: the install completes with one notice, the import falls back
    _run([str(py), "-m", "pip", "uninstall", "-y", "-q", "score-rl"])
    _run([str(py), "-m", "pip", "install", "-q", "setuptools>=77", "wheel", "pybind11"])
    out = _run([str(py), "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", str(sdist)],
               env={**env, "CC": "/bin/false", "CXX": "/bin/false"}, cwd=work)
    notices = [x for x in out.splitlines() if "score-rl: no usable C++ compiler" in x]
    assert len(notices) == 1, out[-3000:]
    line = _check_import(py, work)
    assert "'cpu': False" in line and "'torch': True" in line, line
