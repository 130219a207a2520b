#!/usr/bin/env bash
# Lint, then every test suite: the core package (with the cookbook examples, run end to end)
# and each adapter package in its own folder (each has its own pytest settings).
#
# Tests run in parallel, one pytest-xdist worker per core, each with one torch thread: on a
# small CPU two workers of one thread finish far sooner than one of two threads, because
# much of a test is decoding at batch 1, process start-up and servers answering, which
# extra threads do not speed up. At most 4 workers: each holds its own copy of the model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$PWD/.venv/bin/python"
export OMP_NUM_THREADS=1
CORES=$(getconf _NPROCESSORS_ONLN)  # not nproc: it obeys OMP_NUM_THREADS
WORKERS=$(( CORES < 4 ? CORES : 4 ))
.venv/bin/ruff check .
.venv/bin/ruff format --check .
$PY -m pytest -q -n "$WORKERS" --dist worksteal --durations=20 tests
for project in $(find integrations -name pyproject.toml -not -path "*/.venv/*" | sort); do
  dir=$(dirname "$project")
  if [ -d "$dir/tests" ]; then
    echo "== $dir"
    (cd "$dir" && $PY -m pytest -q -n "$WORKERS" --dist worksteal tests)
  fi
done
