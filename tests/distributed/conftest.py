"""Every test here trains on the embedded default corpus: build it once per session (a no-op when built),
so no test depends on another having run first (a fresh clone has no data/build/)."""

import subprocess
import sys

import pytest

from tests.distributed.training import REPO


@pytest.fixture(scope="session", autouse=True)
def default_corpus():
    subprocess.run([sys.executable, "-m", "pipeline.data", "corpus"], cwd=REPO, check=True, capture_output=True)
