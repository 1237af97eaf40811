"""Builds score_kernels._C from csrc/.

CUDA build (torch with CUDA + nvcc): csrc/*.cpp, csrc/cpu/*.cpp, csrc/cuda/*.cpp, csrc/cuda/*.cu.
CPU build otherwise: csrc/*.cpp and csrc/cpu/*.cpp with OpenMP.
SCORE_NO_EXT=1 skips the extension; the package then runs on its Triton and PyTorch paths. So does a
machine with no usable C++ compiler ($CXX, default c++): the build prints one line and installs the Python
package without score_kernels._C, never an install or import error.
"""
import glob
import os
import shlex
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("SCORE_NO_EXT", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # metadata-only builds (sdist) need no torch
        return [], {}

    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    # -fno-trapping-math: GCC will not if-convert a float select it thinks may trap, which left the AVX2
    # clones of the per-element loops scalar (k3 token_kl 12 ns an element); results are unchanged (no
    # code here reads the FP exception flags).
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-trapping-math"]
    use_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("SCORE_FORCE_CPU_EXT", "0") != "1"
    )
    if use_cuda:
        sources += rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
        ext = cpp_extension.CUDAExtension(
            "score_kernels._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("SCORE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "score_kernels._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    base = cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)

    class OptionalBuildExt(base):
        """The extension is an accelerator, not a requirement: with no usable C++ compiler the package
        installs without it. A compiler that runs but fails on our sources still fails the build, so
        compile errors are never hidden."""

        def run(self):
            cxx = os.environ.get("CXX", "c++")
            try:
                subprocess.run(shlex.split(cxx) + ["--version"], check=True, capture_output=True)
            except (OSError, subprocess.CalledProcessError):
                print(f"score-rl: no usable C++ compiler ({cxx!r}); installing without score_kernels._C, the ops "
                      f"use their Triton and PyTorch paths", file=sys.stderr)
                return
            super().run()

    return [ext], {"build_ext": OptionalBuildExt}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
