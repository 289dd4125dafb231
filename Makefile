# One entry point for everything: `make train` runs the main job, `make test` the whole suite.
SHELL := /bin/bash
# A failing benchmark fails `make bench` even when piped through tee.
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/default.py
WORKDIR ?= runs/default

.PHONY: install fashion-mnist chromium train test-data test lint format docs bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[train,dev,equinox,docs]'
	touch $(STAMP)

install: $(STAMP)

FASHION_MNIST := /usr/share/datasets/fashion-mnist
# Fashion-MNIST comes from Debian's dataset-fashion-mnist package where we can install it
# (root on Debian). Anywhere else `make train` lets TFDS download it, and `make test`, whose
# real-data tests read the package's files, stops with a message saying how to get them.
fashion-mnist:
	@if [ ! -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz ] && [ "$$(id -u)" = 0 ] \
		&& command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist \
		|| echo "warning: could not install the Debian package dataset-fashion-mnist" >&2; fi

train: $(STAMP) fashion-mnist
	$(BIN)/python -m train --config $(CONFIG) --workdir $(WORKDIR) \
		$$([ -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz ] || echo --config.dataset.tfds_download=True) \
		$(ARGS)

test-data: fashion-mnist
	@[ -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz ] || { echo "error: the tests need \
	Fashion-MNIST in $(FASHION_MNIST): install the Debian package dataset-fashion-mnist \
	(sudo apt-get install dataset-fashion-mnist, or run make test as root)" >&2; exit 2; }

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The documentation site (docs/): every page's code cells run, any warning is an error (-W:
# a broken docstring, an unresolved cross-reference, a public name without an API entry). The
# pages are read (their code run) in parallel, one process per core.
docs: $(STAMP)
	$(BIN)/sphinx-build -j auto -b html -W --keep-going -q docs docs/_build/html
	@echo "the site is in docs/_build/html (open index.html)"

# tests/test_docs_site.py opens the built site in headless Chromium, from Debian's `chromium`
# package where we can install it (root on Debian); elsewhere that test is skipped and says why.
chromium:
	@if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq chromium \
		|| echo "warning: could not install the Debian package chromium" >&2; fi

# The site is built first: the docs tests (internal links, the browser) check it.
test: lint test-data chromium docs
	$(BIN)/python -m pytest -n 2 tests

EXPERIMENTS := bn_vs_no_bn decay small_batch multi_device jbn_vs_flax
# Everything in the README's results section (about 2.5 hours on 2 CPU cores; the experiments
# resume where they stopped when rerun). Needs the torch extra for the PyTorch columns.
bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[torch]'
	$(BIN)/python benchmarks/bn_ops.py | tee benchmarks/results/bn_ops.md
	$(BIN)/python benchmarks/throughput.py | tee benchmarks/results/throughput.md
	$(BIN)/python benchmarks/resnet.py | tee benchmarks/results/resnet.md
	$(BIN)/python benchmarks/profile_step.py breakdown | tee benchmarks/results/profile_breakdown.md
	$(BIN)/python benchmarks/profile_step.py convolutions | tee benchmarks/results/profile_convolutions.md
	$(BIN)/python benchmarks/profile_step.py page-faults | tee benchmarks/results/profile_page_faults.md
	$(BIN)/python benchmarks/profile_step.py xla-flags | tee benchmarks/results/profile_xla_flags.md
	for experiment in $(EXPERIMENTS); do \
		$(BIN)/python benchmarks/experiments.py $$experiment | tee benchmarks/results/$$experiment.md \
		&& cp runs/experiments/$$experiment/results.json benchmarks/results/$$experiment.json \
		&& cp runs/experiments/$$experiment/results.png benchmarks/results/$$experiment.png \
		|| exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache docs/_build docs/api/_autosummary
