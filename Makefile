# The two commands of the README: `make book` and `make test`. Both create .venv on a fresh
# machine (python3 is all they need) and re-create it when requirements.txt changes.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.requirements.sha256
REQ_HASH := $(shell sha256sum requirements.txt pyproject.toml | sha256sum | cut -c1-16)
# Two cores: one torch process at a time, using both (see the README on threads).
export PYTHONHASHSEED := 0

.PHONY: venv book test test-unit test-notebooks execute links check-links bench clean help

help:
	@echo "make book      create .venv, execute every notebook, render HTML into _build/html (-W)"
	@echo "make test      create .venv, run unit + kernel tests and every notebook through nbval"
	@echo "make execute   re-execute the committed notebooks in place (commit their outputs)"
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

# Execute every notebook each time (execute_notebooks: force in _config.yml): Jupyter Book's
# cache keys on cells only, not on mini/, so a cached page could show what old code printed.
book: venv check-links
	rm -rf _build  # doctrees too: Sphinx would otherwise reuse old outputs of unchanged notebooks
	$(BIN)/jupyter-book build . -W -n --keep-going --builder html
	@echo ">> site: _build/html/index.html"

test: venv
	$(BIN)/python -m pytest tests -q
	$(BIN)/python -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=900 -p tests.nbtiming book labs -q

test-unit: venv
	$(BIN)/python -m pytest tests -q

test-notebooks: venv
	$(BIN)/python -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=900 -p tests.nbtiming book labs -q

execute: venv
	@for nb in $$(find book labs -name '*.ipynb' -not -path '*/.ipynb_checkpoints/*' | sort); do \
	  echo ">> executing $$nb"; start=$$(date +%s); \
	  $(BIN)/jupyter execute --inplace --timeout=900 --kernel_name=python3 "$$nb" || exit 1; \
	  echo "   $$(( $$(date +%s) - start )) s"; \
	done

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
