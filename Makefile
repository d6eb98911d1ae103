# Quick start: `make demo` and `make test`. Each creates .venv when missing and installs
# torch==2.13.0 (the CPU build) before anything else, so no CUDA build is ever pulled in.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.softmerge-installed

# Torch's OpenMP threads spin while waiting; on a 2-core machine that costs 20-30x whenever
# another process is busy. Passive waiting keeps timings honest.
export OMP_WAIT_POLICY := PASSIVE

.PHONY: install demo test lint bench perf clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,hf]'
	# Test-only reference for the parity tests. --no-deps: mergekit's merge methods need only
	# torch, pydantic and numpy; its full dependency set (transformers, datasets...) is not used.
	$(PY) -m pip install -q --no-deps mergekit==0.1.5 || \
		echo "mergekit could not be installed: the parity tests will be skipped"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/softmerge demo --out demo-out

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

test: $(STAMP) lint
	$(PY) -m pytest -q

# Every claim of the paper, measured (issue 4): trains every candidate from scratch (seeds 0-2;
# --fresh drops bench-out/cache), merges them with every method, times the gate step, then
# writes docs/results.md and docs/results/*.png. About 60-80 minutes on 2 cores; set
# OMP_NUM_THREADS to choose the thread count (recorded on the page with the total run time).
bench: $(STAMP)
	$(PY) benchmarks/run.py --fresh --out bench-out
	$(PY) benchmarks/report.py --results bench-out/results.json --docs docs

# The engine at real model sizes (issue 10): memory of soft merging (curves over N and model
# size), static merges side by side with mergekit-yaml 0.1.5 (installed into its own venv under
# bench-out/engine), gate step vs plain step, gate step on 2 processes (issue 12). Writes
# docs/performance.md. About 35 minutes.
perf: $(STAMP)
	$(PY) benchmarks/engine.py --out bench-out/engine --docs docs

clean:
	rm -rf demo-out bench-out .pytest_cache .ruff_cache
