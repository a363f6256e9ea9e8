"""The README's test command lints before it tests: a lint error stops it with one line naming ruff."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _test_command(repo: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PIPELINE_PYTHON=sys.executable)
    return subprocess.run(["bash", "launch/test.sh", "--collect-only", "-q", "tests/unit/test_lint.py"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)


def test_the_test_command_stops_on_a_lint_error(tmp_path):
    assert importlib.util.find_spec("ruff"), "ruff is not installed (the test extra has it): pip install -e '.[test]'"
    repo = Path(shutil.copytree(REPO, tmp_path / "repo", ignore=shutil.ignore_patterns(
        ".git", ".venv", ".gpu", "build", "runs", "outputs", "__pycache__", ".pytest_cache")))
    clean = _test_command(repo)
    assert clean.returncode == 0, f"the tree as committed should lint clean:\n{clean.stdout}\n{clean.stderr}"
    (repo / "pipeline" / "lint_probe.py").write_text('"""A module with an unused import."""\n\nimport os\n')
    dirty = _test_command(repo)
    assert dirty.returncode == 1, dirty.stdout + dirty.stderr
    assert "lint_probe.py" in dirty.stdout and "error: ruff found the problems above" in dirty.stderr, \
        dirty.stdout + dirty.stderr
