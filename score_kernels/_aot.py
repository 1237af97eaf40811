"""Registry of Triton kernel specialisations for the ahead-of-time compile check.

Each op module calls `register(...)` next to its kernels, with the signatures and constexprs its
launcher actually uses on a GPU, so `python -m score_kernels.compile_check` compiles exactly those.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AOTSpec:
    name: str
    kernel: object  # triton.JITFunction
    signature: dict[str, str]
    constexprs: dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    has_dot: bool = False  # expect tensor-core matmuls (wgmma on sm_90, mma on sm_80)


SPECS: list[AOTSpec] = []


def register(name, kernel, signature, constexprs=None, *, num_warps=4, num_stages=3, has_dot=False):
    SPECS.append(AOTSpec(name, kernel, dict(signature), dict(constexprs or {}), num_warps, num_stages, has_dot))
