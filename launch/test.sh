#!/usr/bin/env bash
# Lint (ruff, rules in pyproject.toml), then the test suite (CPU; GPU tests in tests/gpu skip without
# CUDA). Extra arguments go to pytest.
#   bash launch/test.sh                 # everything
#   bash launch/test.sh tests/unit -x   # a subset
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO"
if "$PY" -c "import ruff" 2>/dev/null; then
  "$PY" -m ruff check --quiet . || { echo "error: ruff found the problems above; fix them (ruff check --fix fixes import order)" >&2; exit 1; }
else
  echo "note: ruff is not installed in $PY, lint skipped (pip install ruff==0.17.6)" >&2
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec "$PY" -m pytest -q "$@"
