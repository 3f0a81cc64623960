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

.PHONY: venv book test test-unit test-notebooks execute timing claims assets links check-links bench site check-site clean help

help:
	@echo "make book      create .venv, execute every notebook (two at a time), render _build/html (-W -n)"
	@echo "make test      create .venv, unit + kernel tests, site build, every notebook through nbval"
	@echo "make execute   re-execute the committed notebooks in place, regenerate the claims page"
	@echo "make timing    commit the last make test's timing record and the README's time table"
	@echo "make assets    retrain the checkpoint assets of mini/checkpoints (commit them)"
	@echo "make links     regenerate Colab badges and %pip lines from _config.yml's repository"
	@echo "make bench     run bench/ (GPU figures only on a CUDA machine)"
	@echo "make site      build the site as .github/workflows/site.yml deploys it (committed outputs, -W -n)"
	@echo "make check-site  build the site (committed outputs), check every page in headless Chromium"

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

# The site exactly as .github/workflows/site.yml builds and deploys it to GitHub Pages: the
# committed notebooks as they are (no execution), warnings as errors (-W -n), into _build/html.
site: venv
	$(BIN)/python tools/build_site.py
	@echo ">> site: _build/html/index.html (what the site workflow deploys)"

# Every page of the built site in headless Chromium at 1400 px (tools/check_site.py): code
# cells that scroll, unrendered tables and math, links and anchors, numbering, images, console
# errors. Not part of make test. Installs what it needs: Debian's chromium, Playwright
# (requirements-site.txt) and MathJax 3 (npm, answering the CDN's requests offline; without it
# math is checked statically). Options: make check-site CHECK_SITE_ARGS="--max-scroll 5";
# SITE_BUILT=1 checks the _build/html that `make site` left instead of building it again.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SITE_TOOLS := _build/check_site
MATHJAX_VERSION := 3.2.2
CHECK_SITE_ARGS ?=

check-site: venv
	@[ -x /usr/bin/chromium ] || { $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium; }
	$(BIN)/python -m pip install -q -r requirements-site.txt
	@[ -f $(SITE_TOOLS)/node_modules/mathjax/es5/tex-mml-chtml.js ] || { \
	  { command -v npm >/dev/null || { $(SUDO) apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q npm; }; } && \
	  mkdir -p $(SITE_TOOLS) && npm install -q --prefix $(SITE_TOOLS) --no-save --no-audit --no-fund \
	    mathjax@$(MATHJAX_VERSION); } || echo ">> no MathJax: math is checked statically"
	@[ -n "$(SITE_BUILT)" ] || $(MAKE) --no-print-directory site
	$(BIN)/python tools/check_site.py $(CHECK_SITE_ARGS)

clean:
	rm -rf _build .pytest_cache
