# The two commands of the README: `make book` and `make test`. Both create .venv on a fresh
# machine (python3 is all they need) and re-create it when requirements.txt changes.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.requirements.sha256
REQ_HASH := $(shell sha256sum requirements.txt pyproject.toml | sha256sum | cut -c1-16)
# Two cores: two processes of one thread each at most (see the README on threads).
export PYTHONHASHSEED := 0

.PHONY: venv book test test-unit test-notebooks execute timing claims assets links check-links bench clean help

help:
	@echo "make book      create .venv, execute every notebook (two at a time), render _build/html (-W -n)"
	@echo "make test      create .venv, unit + kernel tests, site build, every notebook through nbval"
	@echo "make execute   re-execute the committed notebooks in place, regenerate the claims page"
	@echo "make timing    commit the last make test's timing record and the README's time table"
	@echo "make assets    retrain the checkpoint assets of mini/checkpoints (commit them)"
	@echo "make links     regenerate Colab badges and %pip lines from _config.yml's repository"
	@echo "make bench     run bench/ (GPU figures only on a CUDA machine)"

venv:
	@if [ ! -x $(BIN)/python ] || [ "$$(cat $(STAMP) 2>/dev/null)" != "$(REQ_HASH)" ]; then \
	  echo ">> creating $(VENV) (requirements hash $(REQ_HASH))"; \
	  rm -rf $(VENV) && $(PY) -m venv $(VENV) && \
	  $(BIN)/python -m pip install -q --upgrade pip && \
	  $(BIN)/python -m pip install -q -r requirements.txt && \
	  $(BIN)/python -m pip install -q --no-deps --no-build-isolation -e . && \
	  echo "$(REQ_HASH)" > $(STAMP); \
	else echo ">> $(VENV) is up to date"; fi

# Execute every notebook each time, two at a time with one thread each (tools/run_notebooks.py),
# in a staged copy (_build/src), then build the site from it with warnings as errors.
book:
	@start=$$(date +%s.%N); $(MAKE) --no-print-directory venv check-links && \
	$(BIN)/python tools/build_site.py --execute --start $$start

# The whole suite, each step timed (tools/test_suite.sh); `make timing` commits the record.
test:
	@MAKE_START=$$(date +%s.%N) bash tools/test_suite.sh

THREADS_ENV := MINI_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MINI_CPUS=1

test-unit: venv
	$(THREADS_ENV) $(BIN)/python -m pytest tests -q -n 2 -p tests.nbtiming

test-notebooks: venv
	$(THREADS_ENV) $(BIN)/python -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=900 \
	  -n 2 --dist loadfile -p tests.nbtiming book labs -q

execute: venv
	$(BIN)/python tools/run_notebooks.py --inplace
	$(BIN)/python tools/claims_page.py --write

timing: venv
	$(BIN)/python tools/timing.py commit

claims: venv
	$(BIN)/python tools/claims_page.py --write

# Checkpoint assets (mini/checkpoints/): trained once, shipped, loaded by the labs.
assets: venv
	$(BIN)/python tools/make_assets.py

links: venv
	$(BIN)/python tools/repo_links.py --write

check-links: venv
	$(BIN)/python tools/repo_links.py --check

bench: venv
	$(BIN)/python bench/cogo_step.py
	$(BIN)/python bench/galore_step.py
	$(BIN)/python bench/quant8.py
	$(BIN)/python bench/qgalore_update.py
	$(BIN)/python bench/sltrain_layer.py

clean:
	rm -rf _build .pytest_cache
