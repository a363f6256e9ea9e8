"""Fixtures shared by every test directory."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def default_corpus():
    """The embedded default corpus and tokenizer under data/build/ (a no-op once built). Tests that read
    the default data ask for this themselves, so any one file or directory runs alone on a fresh clone."""
    proc = subprocess.run([sys.executable, "-m", "pipeline.data", "corpus"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, f"`python -m pipeline.data corpus` failed:\n{proc.stderr[-3000:]}"
