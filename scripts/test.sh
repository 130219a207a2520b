#!/usr/bin/env bash
# Lint, then every test suite: the core package and each adapter package in its own folder
# (each has its own pytest settings).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$PWD/.venv/bin/python"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
$PY -m pytest -q --durations=20 tests
for project in $(find integrations -name pyproject.toml -not -path "*/.venv/*" | sort); do
  dir=$(dirname "$project")
  if [ -d "$dir/tests" ]; then
    echo "== $dir"
    (cd "$dir" && $PY -m pytest -q tests)
  fi
done
# The cookbook must keep working: run every example end to end.
for example in cookbook/*.py; do
  echo "== $example"
  $PY "$example"
done
