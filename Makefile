# The two commands of the README. Both create/reuse .venv through scripts/setup.sh.
.PHONY: setup demo test test-fast perf-gate compile-check

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/score-train

test: setup
	.venv/bin/python -m pytest tests experiments -q
	.venv/bin/python -m pytest benchmarks -q --perf-gate

test-fast: setup
	.venv/bin/python -m pytest tests experiments -q -m "not slow"

compile-check: setup
	.venv/bin/python -m score_kernels.compile_check --arch sm_80,sm_90 --max-spill 0
