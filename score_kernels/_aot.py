"""Registry of Triton kernel specialisations for the ahead-of-time compile check.

Each op module calls `register(...)` next to its kernels, with the signatures and constexprs its
launcher actually uses on a GPU, so `python -m score_kernels.compile_check` compiles exactly those.

Divisibility matters as much as the signature. On a GPU the JIT marks every 16-byte-aligned pointer
and every integer argument divisible by 16 with `tt.divisibility = 16`; only then are loads
vectorised, and only vectorised loads become cp.async and get software-pipelined. Compiled without
those hints, a plain 128x128x64 bf16 matmul kept one shared-memory stage, used 255 registers and
spilled 164 bytes; with them it pipelined 3 stages in 108 registers without spilling. So each spec
lists the arguments that are multiples of 16 at the shapes it stands for (`divisible`); by default
all pointers and every integer argument whose name starts with "stride".
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
    divisible: tuple[str, ...] | None = None  # None: pointers and stride* integers
    archs: tuple[int, int] | None = None  # [min, max) compute capability this spec is launched on

    def for_arch(self, cc: int) -> bool:
        return self.archs is None or self.archs[0] <= cc < self.archs[1]

    def attrs(self) -> dict:
        """Triton's `attrs` for ASTSource: {(arg index,): [["tt.divisibility", 16]]}."""
        names = list(self.kernel.arg_names)
        if self.divisible is None:
            chosen = [k for k, v in self.signature.items()
                      if v.startswith("*") or (k.startswith("stride") and v[0] in "iu")]
        else:
            chosen = list(self.divisible)
        for k in chosen:
            if k not in self.signature or self.signature[k] == "constexpr":
                raise ValueError(f"{self.name}: divisible argument {k!r} is not a runtime argument")
        return {(names.index(k),): [["tt.divisibility", 16]] for k in chosen}


SPECS: list[AOTSpec] = []


def register(name, kernel, signature, constexprs=None, *, num_warps=4, num_stages=3, has_dot=False,
             divisible=None, extra_divisible=(), archs=None):
    """divisible: argument names that are multiples of 16 (pointers: 16-byte aligned); None picks
    pointers and stride* integers, to which extra_divisible adds more (for example a hidden size).
    archs: (min, max) compute capability, max exclusive, for launch configurations chosen per arch."""
    if divisible is None and extra_divisible:
        divisible = tuple(k for k, v in signature.items()
                          if v.startswith("*") or (k.startswith("stride") and v[0] in "iu")) + tuple(extra_divisible)
    SPECS.append(AOTSpec(name, kernel, dict(signature), dict(constexprs or {}), num_warps, num_stages, has_dot,
                         tuple(divisible) if divisible is not None else None, archs))
