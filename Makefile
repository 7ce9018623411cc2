# The two commands of the README:
#   make all   -> install everything into .venv and run the default suite (Snakemake, embedded dataset, CPU)
#   make test  -> install everything into .venv and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cmtkd-installed
CORES  ?= 2

.PHONY: all test install tables bench gpu-check gpu-wheels

all: $(STAMP)
	$(BIN)/snakemake --cores $(CORES)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15  # the slowest tests, to keep the suite under 20 minutes

install: $(STAMP)

# Rebuild results/runs.csv, tables, plots and the report from finished runs (no training).
tables: $(STAMP)
	$(BIN)/snakemake tables --cores 1

# Training-step throughput of every method (CPU, 2 threads); see benchmarks/suite.py --help.
bench: $(STAMP)
	$(BIN)/python benchmarks/suite.py --threads $(CORES)

# The one GPU check (benchmarks/gpu_check.py): cuda tests, a Snakemake grid on the GPU, throughput and
# projections -> benchmarks/results/gpu-<device>-<date>.csv. Runs with the machine's own python3 (GPU
# images bring torch; no venv is made); WHEELS=DIR installs what is missing from a folder of wheels.
WHEELS ?=
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py $(if $(WHEELS),--wheels $(WHEELS))

# On a machine with a package index: the wheels gpu-check needs on a Python 3.12 GPU machine, into .whl/.
gpu-wheels:
	$(PYTHON) benchmarks/gpu_check.py --download-wheels .whl

# torch/torchvision have lower bounds only (pyproject.toml): an installed newer torch is kept.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)
