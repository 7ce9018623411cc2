# The two commands of the README:
#   make all   -> install everything into .venv and run the default suite (embedded dataset, CPU)
#   make test  -> install everything into .venv and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cmtkd-installed
CORES  ?= 2

.PHONY: all test install suite tables bench clean-results

all: $(STAMP)
	$(BIN)/cmtkd train --method qat --arch resnet18 --dataset digits --w-bits 2 --a-bits 2 \
	    --epochs 3 --threads $(CORES) --set model.width=0.25 --out runs/default/qat-resnet18-w2a2
	$(BIN)/cmtkd evaluate runs/default/qat-resnet18-w2a2

test: $(STAMP)
	$(BIN)/python -m pytest -q

install: $(STAMP)

# torch/torchvision ranges in pyproject.toml admit 2.14.1/0.29.1, which pip takes from local disk here.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)
