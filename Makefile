# Two entry points that work on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CODEX := node_modules/.bin/codex
# checkov pins libraries (packaging<24) older than the test suite's: it gets its own venv
CHECKOV := .venv-checkov/bin/checkov

.PHONY: run test install codex checkov lint typecheck bench clean lock

# Installed exactly as locked (hashes checked), like the image: requirements-dev.lock is the
# runtime lock plus the test tools; the project itself goes in without resolving anything.
$(STAMP): pyproject.toml requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

$(CODEX): package.json
	npm install --no-audit --no-fund --loglevel=error
	touch $(CODEX)

codex: $(CODEX)

$(CHECKOV): requirements-checkov.lock
	$(PYTHON) -m venv .venv-checkov
	.venv-checkov/bin/pip install --quiet --require-hashes -r requirements-checkov.lock
	touch $(CHECKOV)

checkov: $(CHECKOV)

# Refresh the locks after a change to pyproject.toml's dependencies (tests/api/test_lock.py fails
# on a stale lock). pip-tools lives in its own venv, out of the locked one.
PIPCOMPILE := .venv-piptools/bin/pip-compile --quiet --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links
lock:
	[ -x .venv-piptools/bin/pip-compile ] || ($(PYTHON) -m venv .venv-piptools && .venv-piptools/bin/pip install --quiet pip-tools)
	$(PIPCOMPILE) --output-file=requirements.lock pyproject.toml
	$(PIPCOMPILE) --extra=dev --output-file=requirements-dev.lock pyproject.toml
	$(PIPCOMPILE) --output-file=requirements-checkov.lock requirements-checkov.in

# Serve on the embedded defaults (`make run PORT=8080` for another port): SQLite under ./.deksdenflow, in-process queue, a local demo
# repository driven by the scripted engine. No GitHub account needed.
PORT ?= 8000
run: $(STAMP)
	DEKSDENFLOW_DATA_DIR=$${DEKSDENFLOW_DATA_DIR:-.deksdenflow} $(BIN)/deksdenflow serve --demo --host 127.0.0.1 --port $(PORT)

# The whole suite: real Redis (127.0.0.1:6379) and Postgres (127.0.0.1:5432), the real codex CLI.
# `make test` is the one command CI and the README name: the lint and type gates, then the suite
test: lint typecheck $(STAMP) $(CODEX) $(CHECKOV)
	DEKSDENFLOW_CODEX_BIN=$(CURDIR)/$(CODEX) $(BIN)/pytest

# ruff (with E501 at 100 and C901 at 15, see pyproject.toml), the formatting gate and the
# dead-code gate; .pre-commit-config.yaml runs the same locally
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/vulture bot engines vulture_whitelist.py --min-confidence 80

typecheck: $(STAMP)
	$(BIN)/mypy bot engines tests bench

bench: $(STAMP)
	$(BIN)/python bench/intake.py
	$(BIN)/python bench/worktree.py

clean:
	rm -rf $(VENV) node_modules .deksdenflow
