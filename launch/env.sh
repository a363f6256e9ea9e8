# Sourced by the launch scripts: make sure .venv exists with the pinned CPU/dev dependencies.
# Python 3.12 comes from pyenv on our machines ($(pyenv prefix 3.12.1)), else python3.12 on PATH.
# Inside an NVIDIA container with Transformer Engine preinstalled, set PIPELINE_PYTHON to its python
# and this step is skipped.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${PIPELINE_PYTHON:-}" ]; then
  PY="$PIPELINE_PYTHON"
else
  if [ ! -x "$REPO/.venv/bin/python" ] || [ "$REPO/constraints.txt" -nt "$REPO/.venv/.installed" ]; then
    BASE="$( (command -v pyenv >/dev/null && echo "$(pyenv prefix 3.12.1 2>/dev/null)/bin/python3.12") || true)"
    [ -x "$BASE" ] || BASE="$(command -v python3.12)" || { echo "error: Python 3.12 not found; install it (pyenv install 3.12.1)" >&2; exit 2; }
    echo "setting up $REPO/.venv with $BASE (pinned by constraints.txt; a few minutes the first time)" >&2
    "$BASE" -m venv "$REPO/.venv"
    "$REPO/.venv/bin/pip" install -q --upgrade pip
    "$REPO/.venv/bin/pip" install -q -c "$REPO/constraints.txt" -e "$REPO[test]"
    touch "$REPO/.venv/.installed"
  fi
  PY="$REPO/.venv/bin/python"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
