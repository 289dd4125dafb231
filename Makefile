# One entry point for everything: `make train` runs the main job, `make test` the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/default.py
WORKDIR ?= runs/default

.PHONY: install train test lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

FASHION_MNIST := /usr/share/datasets/fashion-mnist
# Fashion-MNIST comes from Debian's dataset-fashion-mnist package where we can install it
# (root on Debian); anywhere else TFDS is allowed to download it.
train: $(STAMP)
	@if [ ! -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz ] && [ "$$(id -u)" = 0 ] \
		&& command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; fi
	$(BIN)/python -m train --config $(CONFIG) --workdir $(WORKDIR) \
		$$([ -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz ] || echo --config.dataset.tfds_download=True) \
		$(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -n 2 tests

bench: $(STAMP)
	$(BIN)/python benchmarks/bn_ops.py
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
