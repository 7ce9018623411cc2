# The two commands of the README:
#   make all   -> install everything into .venv and run the default suite (Snakemake, embedded dataset, CPU)
#   make test  -> install everything into .venv and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cmtkd-installed
CORES  ?= 2

.PHONY: all test install tables bench

all: $(STAMP)
	$(BIN)/snakemake --cores $(CORES)

test: $(STAMP)
	$(BIN)/python -m pytest -q

install: $(STAMP)

# Rebuild results/runs.csv, tables, plots and the report from finished runs (no training).
tables: $(STAMP)
	$(BIN)/snakemake tables --cores 1

# Training-step throughput of every method (CPU, 2 threads); see benchmarks/suite.py --help.
bench: $(STAMP)
	$(BIN)/python benchmarks/suite.py --threads $(CORES)

# torch/torchvision have lower bounds only (pyproject.toml): an installed newer torch is kept.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)
