# Two commands: `make up` runs the whole system, `make test` runs every test.
# Both create .venv and install what they need; Go modules come from the module proxy.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATTERN ?= both
# honcho sets PORT per process; keep Redis's port explicit.
export REDIS_PORT ?= 6379

.DEFAULT_GOAL := help
.PHONY: help up down test lint bench bench-full go-build install-local install-dev clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-local: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[local]'
	@touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@ $(VENV)/.installed-local

install-local: $(VENV)/.installed-local
install-dev: $(VENV)/.installed-dev

go-build: ## Build the Go subscriber into go-subscriber/bin/
	cd go-subscriber && go build -o bin/go-subscriber .

up: install-local go-build ## Run Redis and every process (Ctrl-C stops all); PATTERN=queue make up
	@mkdir -p var
	$(BIN)/honcho start -f Procfile

down: ## Stop a `make up` running in another terminal
	-@pkill -TERM -f '$(BIN)/honcho start -f Procfile' && echo "stopping..." || echo "nothing running"

test: install-dev ## Run ruff, pytest and the Go tests against a real Redis
	cd go-subscriber && go mod download
	tools/test.sh

lint: install-dev ## ruff, mypy, the import contract (lint-imports), gofmt, go vet
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	cd go-subscriber && test -z "$$(gofmt -l .)" && go vet ./...

bench: install-dev ## Benchmark suite, quick mode (< 2 min); table + bench-results/latest.json
	$(BIN)/python -m benchmarks --mode $${BENCH_MODE:-quick}

bench-full: install-dev ## Benchmark suite, full sizes (about 10 min)
	$(BIN)/python -m benchmarks --mode full

lock: install-dev ## Regenerate requirements.lock (hash-pinned deps of the Docker image)
	$(BIN)/pip-compile --quiet --generate-hashes --strip-extras --allow-unsafe \
		--no-emit-index-url --no-emit-find-links --output-file requirements.lock pyproject.toml

# Vulnerability audits need the internet's advisory databases: PyPI's per-version JSON
# API (pip-audit) and vuln.go.dev (govulncheck). --strict: a package that could not be
# checked is a failure, never a silent pass.
audit: install-dev ## pip-audit of requirements.lock and govulncheck of go-subscriber
	$(BIN)/pip-audit --strict --require-hashes --disable-pip -r requirements.lock
	cd go-subscriber && go run golang.org/x/vuln/cmd/govulncheck@v1.1.4 ./...

chaos: install-dev ## Fault scoreboard: every scenario against the real stack, a table of figures
	$(BIN)/python -m chaos

chaos-quick: install-dev ## The short scoreboard CI runs (tests/e2e/test_scoreboard.py)
	$(BIN)/python -m chaos --quick

clean: ## Remove the virtual environment, build output and local data
	rm -rf $(VENV) var go-subscriber/bin
