# Two commands on a fresh machine: `make run` and `make test`.
# The venv is created once; a stamp file means re-running a target never reinstalls torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ips-search-installed
TRIALS ?= 16
# make run: a short search with ASHA early stopping (the tour's time budget; the CLI's default is FIFO), then its
# best config trained once more with a new seed (mean and spread over 2 seeds)
RUN_FLAGS ?= --scheduler asha --confirm 1 --confirm-top 1
ARGS ?=

.PHONY: install run test bench lint format clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) -m ips_search.run --trials $(TRIALS) $(RUN_FLAGS) $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

bench: install
	$(PY) benchmarks/bench_ips.py $(ARGS)

lint: install
	$(VENV)/bin/ruff check ips_search tests benchmarks
	$(VENV)/bin/ruff format --check ips_search tests benchmarks

format: install
	$(VENV)/bin/ruff format ips_search tests benchmarks
	$(VENV)/bin/ruff check --fix ips_search tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
