"""Ahead-of-time compile every registered Triton kernel for GPU targets, with no GPU present.

    python -m score_kernels.compile_check [--arch sm_80,sm_90] [--filter NAME] [--json PATH]

Prints kernel, arch, num_warps, shared memory (bytes), and whether tl.dot lowered to tensor cores
(wgmma on sm_90, mma on sm_80). Exits non-zero on any compile failure, or when a kernel that
should use tensor cores does not.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _arch_cc(arch: str) -> int:
    a = arch.strip().lower().removeprefix("sm_").rstrip("a")
    return int(a)


def _tc_used(ptx: str, cc: int) -> bool:
    if cc >= 90:
        return "wgmma" in ptx
    return "mma.sync" in ptx


def run(archs: list[str], name_filter: str | None = None) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("compile_check needs real Triton kernels: unset TRITON_INTERPRET")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import score_kernels  # noqa: F401  (imports every op module, which registers its kernels)
    from score_kernels import _aot

    rows = []
    for spec in _aot.SPECS:
        if name_filter and name_filter not in spec.name:
            continue
        for arch in archs:
            cc = _arch_cc(arch)
            row = {"kernel": spec.name, "arch": f"sm_{cc}", "ok": False}
            t0 = time.time()
            try:
                src = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs)
                k = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                   options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
                ptx = k.asm.get("ptx", "")
                row.update(ok=True, num_warps=k.metadata.num_warps, shared=k.metadata.shared,
                           tensor_cores=_tc_used(ptx, cc), expects_dot=spec.has_dot)
                if spec.has_dot and not row["tensor_cores"]:
                    row.update(ok=False, error="tl.dot did not lower to " + ("wgmma" if cc >= 90 else "mma"))
            except Exception as e:  # report every failure, keep going
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            row["seconds"] = round(time.time() - t0, 2)
            rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--arch", default="sm_80,sm_90")
    p.add_argument("--filter", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = run([a for a in args.arch.split(",") if a], args.filter)
    w = max([len(r["kernel"]) for r in rows] + [6])
    print(f"{'kernel':<{w}}  arch   warps  shared_B  tensor_cores  status")
    for r in rows:
        tc = "-" if not r.get("expects_dot") else ("wgmma" if r["arch"] == "sm_90" else "mma") if r.get(
            "tensor_cores") else "NO"
        status = "ok" if r["ok"] else "FAIL " + r.get("error", "")
        print(f"{r['kernel']:<{w}}  {r['arch']:<5}  {r.get('num_warps', '-'):>5}  {r.get('shared', '-'):>8}  "
              f"{tc:>12}  {status}")
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(bad)} compiled, {len(bad)} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if not rows:
        print("no kernels registered", file=sys.stderr)
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
