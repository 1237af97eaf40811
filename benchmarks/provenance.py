"""Where a record was measured: the commit and the machine, written into every standalone record
(benchmarks/*.py and experiments/*/)."""
from __future__ import annotations

import os
import platform
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commit() -> str:
    """The checkout's short commit hash, or "unknown" outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    """Cores, CPU model, its bf16 matmul units (bf16 speed depends on them: AMX-BF16 or AVX512-BF16, else none)
    and the load average."""
    cpu, flags = platform.processor() or "cpu", set()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = next(x.split(":", 1)[1].strip() for x in lines if x.startswith("model name"))
        flags = set(next((x.split(":", 1)[1].split() for x in lines if x.startswith("flags")), []))
    except (OSError, StopIteration):
        pass
    bf16 = "AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "no bf16 units"
    return f"{os.cpu_count()} cores ({cpu}; {bf16}), load average at start {os.getloadavg()[0]:.1f}"
