# Set-up is part of every entry point: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2

.PHONY: setup demo test test-slurm test-slurm-accounting bench lint dag clean

setup: $(STAMP)

# torch first, from its exact pin (a bare `torch` would pull a multi-GB CUDA build), then the lock file.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: setup
	$(BIN)/snakemake --cores $(CORES)
	$(BIN)/snakemake --report results/report.html

test: setup
	$(BIN)/python -m pytest -m "not slurm" tests

# a real one-node Slurm cluster on this machine (root; installs slurm-wlm and munge if missing);
# -rP prints what the cluster ran (job ids and rules)
test-slurm: setup
	$(BIN)/python -m pytest -m slurm -rP tests

# the same with slurmdbd on MariaDB (installed if missing), so job states come from sacct, the plugin's default
test-slurm-accounting: setup
	MOE_COMPRESS_SLURM_ACCOUNTING=1 $(BIN)/python -m pytest -m slurm -rP tests

# the benchmarks in bench/: each prints the ratios it measured and writes results/bench/<name>.csv
# (about 30 min on 2 cores, most of it the demo's cold run; BENCH_RERUN_FLAGS=--no-eval shortens that)
bench: setup
	$(BIN)/python bench/calibration_overhead.py
	$(BIN)/python bench/streaming_memory.py
	$(BIN)/python bench/dry_run_scale.py
	$(BIN)/python bench/per_layer_cost.py
	$(BIN)/python bench/rerun_ratio.py $(BENCH_RERUN_FLAGS)

lint: setup
	$(BIN)/snakemake --lint

dag: setup
	$(BIN)/snakemake --dag results/final_table.csv | dot -Tsvg > docs/dag.svg

clean:
	rm -rf results .snakemake
