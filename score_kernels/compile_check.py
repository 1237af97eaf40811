"""Ahead-of-time compile every registered Triton kernel for GPU targets, with no GPU present.

    python -m score_kernels.compile_check [--arch sm_80,sm_90] [--filter NAME] [--json PATH] [--jobs N]

Prints kernel, arch, num_warps, shared memory (bytes), registers per thread and spilled bytes (from
ptxas), whether the loads were software-pipelined (cp.async in the PTX), and whether tl.dot lowered
to tensor cores (wgmma on sm_90, mma on sm_80). Exits non-zero on any compile failure, when a kernel
that should use tensor cores does not, or when a kernel spills more than --max-spill bytes.
Kernels are compiled with the divisibility hints the JIT gives aligned tensors (see _aot.py).
Triton compiles one kernel at a time in its process, so --jobs N (default: the CPU count) splits the
kernels over N child processes (`--shard i/N` each) and merges their rows in the single-process order.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time


def _arch_cc(arch: str) -> int:
    a = arch.strip().lower().removeprefix("sm_").rstrip("a")
    return int(a)


def _tc_used(ptx: str, cc: int) -> bool:
    if cc >= 90:
        return "wgmma" in ptx
    return "mma.sync" in ptx


def _ptxas_usage(log: str) -> dict:
    """Registers and spill bytes from ptxas -v output (the kernel's own function, the last one listed)."""
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    out = {}
    if regs:
        out["registers"] = int(regs[-1])
    if spills:
        out["spill_bytes"] = max(int(spills[-1][0]), int(spills[-1][1]))
    return out


def _compile(triton, src, target, options):
    """triton.compile with ptxas's -v log captured: Triton prints it when dump_ptxas_log is set, and
    always_compile makes ptxas run even when the kernel is in Triton's cache. A Triton without these
    knobs gives no log, and the rows then carry no register counts."""
    knobs = getattr(triton, "knobs", None)
    if knobs is None or not hasattr(knobs.nvidia, "dump_ptxas_log"):
        return triton.compile(src, target=target, options=options), ""
    buf = io.StringIO()
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    try:
        knobs.nvidia.dump_ptxas_log = knobs.compilation.always_compile = True
        with contextlib.redirect_stdout(buf):
            k = triton.compile(src, target=target, options=options)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    return k, buf.getvalue()


def run(archs: list[str], name_filter: str | None = None, max_spill: int | None = None,
        shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Rows for every (kernel, arch) pair; with shard (i, n) only the pairs whose index is i mod n."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("compile_check needs real Triton kernels: unset TRITON_INTERPRET")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import score_kernels  # noqa: F401  (imports every op module, which registers its kernels)
    from score_kernels import _aot

    rows = []
    index = -1
    for spec in _aot.SPECS:
        if name_filter and name_filter not in spec.name:
            continue
        for arch in archs:
            cc = _arch_cc(arch)
            if not spec.for_arch(cc):
                continue
            index += 1
            if index % shard[1] != shard[0]:
                continue
            row = {"kernel": spec.name, "arch": f"sm_{cc}", "ok": False, "index": index}
            t0 = time.time()
            try:
                src = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs,
                                attrs=spec.attrs())
                k, log = _compile(triton, src, GPUTarget("cuda", cc, 32),
                                  {"num_warps": spec.num_warps, "num_stages": spec.num_stages})
                ptx = k.asm.get("ptx", "")
                row.update(ok=True, num_warps=k.metadata.num_warps, shared=k.metadata.shared,
                           tensor_cores=_tc_used(ptx, cc), expects_dot=spec.has_dot,
                           pipelined="cp.async" in ptx or "cp.async.bulk" in ptx, **_ptxas_usage(log))
                if spec.has_dot and not row["tensor_cores"]:
                    row.update(ok=False, error="tl.dot did not lower to " + ("wgmma" if cc >= 90 else "mma"))
                elif max_spill is not None and row.get("spill_bytes", 0) > max_spill:
                    row.update(ok=False, error=f"spills {row['spill_bytes']} bytes (limit {max_spill})")
            except Exception as e:  # report every failure, keep going
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            row["seconds"] = round(time.time() - t0, 2)
            rows.append(row)
    return rows


def _run_sharded(args, jobs: int) -> list[dict]:
    """The same rows as run(), from `jobs` child processes of this module, one shard each."""
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i in range(jobs):
            cmd = [sys.executable, "-m", "score_kernels.compile_check", "--arch", args.arch,
                   "--shard", f"{i}/{jobs}", "--json", os.path.join(tmp, f"{i}.json")]
            if args.filter:
                cmd += ["--filter", args.filter]
            if args.max_spill is not None:
                cmd += ["--max-spill", str(args.max_spill)]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        rows = []
        for i, proc in enumerate(procs):
            _, err = proc.communicate()
            path = os.path.join(tmp, f"{i}.json")
            if not os.path.exists(path):  # the shard died before writing: say so, fail the check
                raise SystemExit(f"compile_check shard {i}/{jobs} exited {proc.returncode}:\n{err[-2000:]}")
            with open(path) as f:
                rows += json.load(f)
    return sorted(rows, key=lambda r: r["index"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--arch", default="sm_80,sm_90")
    p.add_argument("--filter", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--max-spill", type=int, default=None, help="fail a kernel that spills more bytes than this")
    p.add_argument("--jobs", type=int, default=None, help="child processes (default: the CPU count)")
    p.add_argument("--shard", default=None, help="i/n: compile only every n-th pair from the i-th (what --jobs runs)")
    args = p.parse_args(argv)
    archs = [a for a in args.arch.split(",") if a]
    if args.shard is not None:
        try:
            i, n = (int(x) for x in args.shard.split("/"))
            if not 0 <= i < n:
                raise ValueError
        except ValueError:
            p.error(f"--shard must be i/n with 0 <= i < n, got {args.shard!r}")
        rows = run(archs, args.filter, args.max_spill, (i, n))
    else:
        jobs = args.jobs if args.jobs is not None else (os.cpu_count() or 1)
        if jobs < 1:
            p.error(f"--jobs must be >= 1, got {jobs}")
        rows = run(archs, args.filter, args.max_spill) if jobs == 1 else _run_sharded(args, jobs)
    w = max([len(r["kernel"]) for r in rows] + [6])
    print(f"{'kernel':<{w}}  arch   warps  shared_B  regs  spill_B  pipelined  tensor_cores  status")
    for r in rows:
        tc = "-" if not r.get("expects_dot") else ("wgmma" if r["arch"] == "sm_90" else "mma") if r.get(
            "tensor_cores") else "NO"
        status = "ok" if r["ok"] else "FAIL " + r.get("error", "")
        pipe = "-" if "pipelined" not in r else ("yes" if r["pipelined"] else "no")
        print(f"{r['kernel']:<{w}}  {r['arch']:<5}  {r.get('num_warps', '-'):>5}  {r.get('shared', '-'):>8}  "
              f"{r.get('registers', '-'):>4}  {r.get('spill_bytes', '-'):>7}  {pipe:>9}  {tc:>12}  {status}")
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(bad)} compiled, {len(bad)} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if not rows and args.shard is None:  # a shard may be empty when --filter leaves few kernels
        print("no kernels registered", file=sys.stderr)
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
