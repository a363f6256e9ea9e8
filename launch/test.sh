#!/usr/bin/env bash
# Run the test suite (CPU; GPU tests in tests/gpu skip without CUDA). Extra arguments go to pytest.
#   bash launch/test.sh                 # everything
#   bash launch/test.sh tests/unit -x   # a subset
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec "$PY" -m pytest -q "$@"
