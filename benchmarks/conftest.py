"""Paired benchmarks and the ratio gate.

Every benchmark test is parametrised over variant in ("baseline", "ours") and calls the `paired`
fixture: pytest-benchmark times each variant (median of a few rounds; a round of a fast op is
several back-to-back calls) in the same run, baseline first. With `--perf-gate`, the `ours` test
times the baseline again right after ours in every round, so that both see the same load, and checks

    time ratio   = median(ours) / median(baseline)           <= thresholds.yaml[machine][op].time
    memory ratio = peak extra(ours) / peak extra(baseline)   <= thresholds.yaml[machine][op].memory

Both sides slow down together on a busy machine, so the ratio holds where milliseconds do not. A
time ratio over its threshold is re-measured once more (interleaved) before it fails, so one burst
of load on one side does not fail the run; a real regression fails both passes. Memory is measured
in a fresh process per variant on the CPU (benchmarks/memory_probe.py) and with
torch.cuda.max_memory_allocated on a GPU.
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
import yaml

from benchmarks import memory_probe

THRESHOLDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "thresholds.yaml")
VARIANTS = ("baseline", "ours")

_MEDIANS: dict[tuple, dict] = {}  # (op, machine) -> {variant: median seconds}
_MEMORY: dict[tuple, dict] = {}  # (op, machine) -> {variant: peak extra bytes}
_CASE: dict = {}  # the last built case, shared by its two variant tests
_SUMMARY: list[tuple] = []  # (where, time ratio, limit, memory ratio, limit, ok) per gated op


def pytest_addoption(parser):
    g = parser.getgroup("score perf gate")
    g.addoption("--perf-gate", action="store_true",
                help="fail when ours/baseline time or memory ratios exceed benchmarks/thresholds.yaml")
    g.addoption("--bench-machine", choices=("cpu", "gpu"), default="cpu",
                help="shape registry from benchmarks/shapes.py (gpu runs on CUDA); default cpu")
    g.addoption("--bench-memory", action="store_true",
                help="also measure peak extra memory per variant (always on with --perf-gate)")
    g.addoption("--bench-rounds", type=int, default=None, help="override every case's number of rounds")
    g.addoption("--bench-threads", type=int, default=None,
                help="torch CPU threads (default 1 for cpu shapes: on a shared machine a descheduled thread "
                     "stalls every parallel region's barrier, which punishes ops made of many small kernels "
                     "and skews ratios; 0 keeps torch's default, the default for gpu shapes)")
    g.addoption("--bench-thresholds", default=None, help=f"thresholds file (default {THRESHOLDS})")


def pytest_configure(config):
    threads = config.getoption("--bench-threads", default=None)
    if threads is None:
        threads = 1 if config.getoption("--bench-machine", default="cpu") == "cpu" else 0
    if threads:
        torch.set_num_threads(threads)
        os.environ[memory_probe.THREADS_ENV] = str(threads)  # the memory probes run the same way


def _has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


def load_thresholds(path: str | None = None) -> dict:
    """The limits; on a CPU without AVX-512 the `cpu_no_avx512` rows replace their `cpu` rows (the SIMD clones
    of the C++ kernels differ by target, and these 2-core machines come with either)."""
    with open(path or os.environ.get("SCORE_PERF_THRESHOLDS") or THRESHOLDS) as f:
        table = yaml.safe_load(f) or {}
    narrow = table.pop("cpu_no_avx512", None)
    if narrow and "cpu" in table and not _has_avx512():
        table["cpu"] = {**table["cpu"], **narrow}
    return table


def _sync(machine: str, fn):
    if machine != "gpu":
        return fn

    def synced():
        out = fn()
        torch.cuda.synchronize()
        return out

    return synced


def _interleaved(ours, baseline, rounds: int, calls: int = 1) -> tuple[float, float]:
    """Per-call medians with the variants alternating (and alternating who goes first) round by
    round; a round times `calls` back-to-back calls."""
    t = {"ours": [], "baseline": []}
    fns = {"ours": ours, "baseline": baseline}
    for v in ("ours", "baseline"):
        fns[v]()  # warm-up
    for r in range(rounds):
        for v in (("ours", "baseline") if r % 2 else ("baseline", "ours")):
            t0 = time.perf_counter()
            for _ in range(calls):
                fns[v]()
            t[v].append((time.perf_counter() - t0) / calls)
    return statistics.median(t["ours"]), statistics.median(t["baseline"])


def _fmt_t(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.3f} s"


def _fmt_b(b: float) -> str:
    return f"{b / 2**20:.1f} MiB"


def _machine_name(machine: str) -> str:
    if machine == "gpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{os.cpu_count()} cores, {torch.get_num_threads()} thread{'s' * (torch.get_num_threads() > 1)}"


@pytest.fixture
def paired(request, benchmark):
    """paired(op, variant): benchmark one variant of CASES[op] from the calling test module."""
    cfg = request.config
    machine = cfg.getoption("--bench-machine")
    gate = cfg.getoption("--perf-gate")
    if machine == "gpu" and not torch.cuda.is_available():
        pytest.skip("--bench-machine gpu needs a CUDA GPU")

    def run(op: str, variant: str):
        module = request.module.__name__
        key = (module, op, machine)
        if _CASE.get("key") != key:
            _CASE.clear()
            if machine == "gpu":
                torch.cuda.empty_cache()
            try:
                _CASE.update(key=key, case=memory_probe.load_case(module, op, machine))
            except KeyError as e:  # benchmarks/shapes.py has no entry for this op on this machine kind
                pytest.skip(f"no '{machine}' shape for {op} in benchmarks/shapes.py ({e})")
        case = _CASE["case"]
        fn = _sync(machine, case[variant])
        rounds = cfg.getoption("--bench-rounds") or case.get("rounds", 5)
        benchmark.group = f"{op} [{case['shape']}]"
        benchmark.extra_info.update(op=op, variant=variant, shape=case["shape"], machine=machine,
                                    device=_machine_name(machine))
        meds = _MEDIANS.setdefault((op, machine), {})
        # A round times `iterations` back-to-back calls: rounds of tens of milliseconds average over
        # the scheduler's time slices, where a millisecond call is either preempted or not.
        calls = case.get("iterations", 1)
        if gate and variant == "ours":
            # Under the gate the baseline runs the same number of calls right after ours in every
            # round, so both see the same load; its own test's median is not used.
            partner, times = _sync(machine, case["baseline"]), []

            def teardown(*_a, **_k):
                t0 = time.perf_counter()
                for _ in range(calls):
                    partner()
                times.append((time.perf_counter() - t0) / calls)

            benchmark.pedantic(fn, teardown=teardown, rounds=rounds, iterations=calls, warmup_rounds=1)
            meds["baseline"] = statistics.median(times[1:]) if len(times) > 1 else None
        else:
            benchmark.pedantic(fn, rounds=rounds, iterations=calls, warmup_rounds=1)
        stats = getattr(benchmark, "stats", None)
        meds[variant] = stats.stats.median if stats is not None else None
        if gate and variant == "ours" and meds["ours"] and meds["baseline"]:
            benchmark.extra_info.update(paired_baseline_s=meds["baseline"], time_ratio=meds["ours"] / meds["baseline"])

        limits = (load_thresholds(cfg.getoption("--bench-thresholds")).get(machine) or {}).get(op) or {}
        if variant == "ours" and (cfg.getoption("--bench-memory") or (gate and limits.get("memory") is not None)):
            mem = _MEMORY[(op, machine)] = _peak_extra(module, op, machine, case)
            benchmark.extra_info.update(peak_extra_bytes=mem["ours"], baseline_peak_extra_bytes=mem["baseline"])
        if gate and variant == "ours":
            _gate(cfg, module, op, machine, case, rounds)

    return run


def _peak_extra(module, op, machine, case) -> dict:
    """Peak extra bytes of both variants: on the CPU two fresh processes, run side by side (only
    memory is read there, so they need not take turns)."""
    if machine == "gpu":
        return {v: memory_probe.cuda_peak_extra(case[v]) for v in VARIANTS}
    return memory_probe.probe_subprocesses(module, op, VARIANTS, machine)


def _gate(cfg, module: str, op: str, machine: str, case: dict, rounds: int):
    table = load_thresholds(cfg.getoption("--bench-thresholds")).get(machine)
    if table is None:
        pytest.skip(f"no '{machine}' section in thresholds.yaml: record ratios on this machine kind first")
    limits = table.get(op)
    med = _MEDIANS.get((op, machine), {})
    where = f"{op} [{case['shape']}] on {machine}"
    if limits is not None and all(v is None for v in limits.values()):  # a row whose limits await a first run
        pytest.skip(f"perf gate: {where}: limits are null in thresholds.yaml (not measured yet)")
    if limits is None:
        pytest.fail(f"perf gate: no threshold for {where} in thresholds.yaml; measured medians "
                    f"ours {med.get('ours')}, baseline {med.get('baseline')}: add one with headroom",
                    pytrace=False)
    errors, t_ratio, m_ratio = [], None, None
    if limits.get("time") is not None:
        ours_fn, base_fn = _sync(machine, case["ours"]), _sync(machine, case["baseline"])
        m_o, m_b = med.get("ours"), med.get("baseline")
        note = f"medians of {rounds} interleaved rounds"
        if m_o is None or m_b is None:  # benchmark disabled or baseline deselected: time both here
            m_o, m_b = _interleaved(ours_fn, base_fn, rounds, case.get("iterations", 1))
            note = f"median of {rounds} interleaved rounds"
        ratio = m_o / m_b
        if ratio > limits["time"]:
            first = ratio
            m_o, m_b = _interleaved(ours_fn, base_fn, max(rounds, 5), case.get("iterations", 1))
            ratio = m_o / m_b
            note = f"confirmed over {max(rounds, 5)} interleaved rounds; first pass {first:.3f}"
        t_ratio = ratio
        if ratio > limits["time"]:
            errors.append(f"perf gate: {where}: time ratio ours/baseline {ratio:.3f} > threshold "
                          f"{limits['time']} (median ours {_fmt_t(m_o)}, baseline {_fmt_t(m_b)}; {note})")
    if limits.get("memory") is not None:
        mem = _MEMORY.get((op, machine)) or _peak_extra(module, op, machine, case)
        p_o, p_b = mem["ours"], mem["baseline"]
        if p_o is None or p_b is None:
            errors.append(f"perf gate: {where}: memory not measured (ours {p_o}, baseline {p_b})")
        else:
            ratio = m_ratio = p_o / max(p_b, 1)
            if ratio > limits["memory"]:
                errors.append(f"perf gate: {where}: memory ratio ours/baseline {ratio:.3f} > threshold "
                              f"{limits['memory']} (peak extra ours {_fmt_b(p_o)}, baseline {_fmt_b(p_b)})")
    _SUMMARY.append((where, t_ratio, limits.get("time"), m_ratio, limits.get("memory"), not errors))
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables, so CI logs end with the verdict
def pytest_terminal_summary(terminalreporter):
    if not _SUMMARY:
        return
    tr = terminalreporter
    tr.section("perf gate: ours / baseline")
    tr.write_line(f"{'op [shape] on machine':<72} {'time':>7} {'limit':>6} {'memory':>7} {'limit':>6}")
    for where, t, tl, m, ml, ok in _SUMMARY:
        def f(x):
            return "-" if x is None else f"{x:.3f}"
        tr.write_line(f"{where[:72]:<72} {f(t):>7} {tl or '-'!s:>6} {f(m):>7} {ml or '-'!s:>6}"
                      f"{'' if ok else '  FAIL'}")
