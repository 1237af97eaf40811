"""Registry of Triton kernel specialisations for the ahead-of-time compile check.

Each op module calls `register(...)` next to its kernels, with the signatures and constexprs its
launcher actually uses on a GPU, so `python -m score_kernels.compile_check` compiles exactly those.

Divisibility matters as much as the signature. On a GPU the JIT marks every 16-byte-aligned pointer
and every integer argument divisible by 16 with `tt.divisibility = 16`; only then are loads
vectorised, and only vectorised loads become cp.async and get software-pipelined. Compiled without
those hints, a bf16 matmul tile keeps one shared-memory stage and spills registers; with them it
pipelines without spilling. So each spec marks all pointers and every integer argument whose name
starts with "stride", plus the arguments it names as multiples of 16 at the shapes it stands for
(`extra_divisible`).
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
    extra_divisible: tuple[str, ...] = ()  # beyond pointers and stride* integers, e.g. a hidden size
    archs: tuple[int, int] | None = None  # [min, max) compute capability this spec is launched on

    def for_arch(self, cc: int) -> bool:
        return self.archs is None or self.archs[0] <= cc < self.archs[1]

    def attrs(self) -> dict:
        """Triton's `attrs` for ASTSource: {(arg index,): [["tt.divisibility", 16]]}."""
        names = list(self.kernel.arg_names)
        chosen = [k for k, v in self.signature.items()
                  if v.startswith("*") or (k.startswith("stride") and v[0] in "iu")]
        for k in self.extra_divisible:
            if k not in self.signature or self.signature[k] == "constexpr":
                raise ValueError(f"{self.name}: divisible argument {k!r} is not a runtime argument")
            chosen.append(k)
        return {(names.index(k),): [["tt.divisibility", 16]] for k in chosen}


SPECS: list[AOTSpec] = []


def register(name, kernel, signature, constexprs=None, *, num_warps=4, num_stages=3, has_dot=False,
             extra_divisible=(), archs=None):
    """extra_divisible: argument names, besides pointers (16-byte aligned) and stride* integers, that
    are multiples of 16 at the shapes the spec stands for (for example a hidden size).
    archs: (min, max) compute capability, max exclusive, for launch configurations chosen per arch."""
    SPECS.append(AOTSpec(name, kernel, dict(signature), dict(constexprs or {}), num_warps, num_stages, has_dot,
                         tuple(extra_divisible), archs))
