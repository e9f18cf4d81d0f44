#!/usr/bin/env bash
# The whole test suite: ruff, pytest (unit, contract, integration, e2e) and the Go
# subscriber's vet + race tests, all against ONE real Redis server started here on a
# free port and stopped on exit. `make test` and `.ci/run` call exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python

tmp=$(mktemp -d)
port=$($PY -c 'from devtools.redis_server import free_port; print(free_port())')
$PY -m devtools.redis_server --port "$port" --dir "$tmp" --no-appendonly >"$tmp/server.out" 2>&1 &
redis_pid=$!
cleanup() { kill "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
for _ in $(seq 1 200); do
  $PY -c "from devtools.redis_server import RedisServer as R; import sys; s=R.__new__(R); s.port=$port; sys.exit(0 if s.ping() else 1)" && break
  sleep 0.05
done
export REDIS_TEST_URL="redis://127.0.0.1:$port/0" REDIS_TEST_ADDR="127.0.0.1:$port"
echo "== test Redis: $(cat "$tmp/server.out")"

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .

echo "== pytest"
# Two processes (PYTEST_WORKERS; 0 = none): the end-to-end tests, one whole stack at a
# time, in one (their xdist_group); unit, contract and integration tests in the other.
# Most of a test's time is spent waiting on the real processes it drives, so two share
# the two cores well.
workers=${PYTEST_WORKERS:-2}
.venv/bin/pytest -n "$workers" --dist loadgroup "$@"

echo "== go vet, gofmt, go test -race (go-subscriber)"
cd go-subscriber
unformatted=$(gofmt -l .)
if [ -n "$unformatted" ]; then echo "gofmt would change: $unformatted"; exit 1; fi
go vet ./...
# DB 1 so the Go tests' FLUSHDB never races the Python tests' database 0.
REDIS_TEST_DB=1 go test -race -count=1 ./...
# Allocation counts are only the code's own without the race detector: those tests
# skip under -race and run here.
go test -count=1 -run 'Allocates' ./...
