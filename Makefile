# The two commands of the README:
#   make all   -> install everything into .venv and run the default suite (Snakemake, embedded dataset, CPU)
#   make test  -> install everything into .venv and run the test suite
#   make reference-check -> rerun cells of the committed reference results and compare (results/reference/README.md)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cmtkd-installed
CORES  ?= 2

.PHONY: all test install tables bench gpu-check gpu-wheels reference reference-publish reference-check verdict verdict-plan

# ... and ends by comparing its runs with the committed default suite, cell by cell: identical seed for
# seed, or within the intervals (Welch, Bonferroni over the cells: reference_check.py), or not; the last
# line is the verdict (exit status 1, "do not agree", is reported, not a failure of the run itself).
COMMITTED_SUITE ?= results/default-suite
all: $(STAMP)
	$(BIN)/snakemake --cores $(CORES)
	$(BIN)/python workflow/scripts/reference_check.py compare . --reference $(COMMITTED_SUITE) --out-dir results/against-committed || test $$? -eq 1

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

# Reference results (results/reference/README.md): config/reference.yaml, run in $(REFERENCE_RUN), published
# into $(REFERENCE)/ (runs.csv, tables, plots, FINGERPRINT.json, ENVIRONMENT.md; no checkpoints).
REFERENCE_CONFIG ?= config/reference.yaml
REFERENCE_RUN    ?= runs/reference
REFERENCE        ?= results/reference
CHECK_DIR        ?= runs/reference-check
CELLS            ?= alexnet:W2A2:qat,alexnet:W2A2:cmtkd
SEEDS            ?=

# The whole reference suite (long: its cost is in config/reference.yaml's header); then reference-publish.
reference: $(STAMP)
	$(BIN)/python -m snakemake --cores $(CORES) --configfile $(REFERENCE_CONFIG) --directory $(REFERENCE_RUN)

# Copy the finished suite's results into $(REFERENCE)/ with a machine-made fingerprint; refuses a partial suite.
reference-publish: $(STAMP)
	$(BIN)/python workflow/scripts/publish_results.py $(REFERENCE_RUN) --configfile $(REFERENCE_CONFIG) --out $(REFERENCE)

# Rerun some cells of the reference in $(CHECK_DIR) (CELLS=ARCH:WxAy:METHOD,... with '*' wildcards, or all;
# SEEDS=0,1, default every reference seed), then compare them with $(REFERENCE)/runs.csv cell by cell:
# exit 0 when every cell agrees (workflow/scripts/reference_check.py says by which rule), 1 when not.
reference-check: $(STAMP)
	targets="$$($(BIN)/python workflow/scripts/reference_check.py targets --reference $(REFERENCE) --cells '$(CELLS)' --seeds '$(SEEDS)')" && \
	$(BIN)/python -m snakemake --cores $(CORES) --configfile $(REFERENCE_CONFIG) --directory $(CHECK_DIR) $$targets && \
	$(BIN)/python -m snakemake tables --cores 1 --configfile $(REFERENCE_CONFIG) --directory $(CHECK_DIR) && \
	$(BIN)/python workflow/scripts/reference_check.py compare $(CHECK_DIR) --reference $(REFERENCE) --out-dir $(CHECK_DIR)/reference-check

# torch/torchvision have lower bounds only (pyproject.toml): an installed newer torch is kept.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# The verdict study (config/verdict.yaml, results/verdict/README.md): every level suite in $(VERDICT_RUN)
# (resumes when rerun), then its tables and plot published into results/verdict/.
VERDICT_RUN ?= studies/verdict
verdict: $(STAMP)
	$(BIN)/python workflow/scripts/verdict.py run --dir $(VERDICT_RUN) --cores $(CORES)
	$(BIN)/python workflow/scripts/verdict.py publish --dir $(VERDICT_RUN) --out results/verdict

# Its levels, runs and estimated CPU hours (priced with results/reference/runs.csv), without training.
verdict-plan: $(STAMP)
	$(BIN)/python workflow/scripts/verdict.py plan --dir $(VERDICT_RUN) --cores $(CORES)
