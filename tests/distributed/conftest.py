"""Every test here trains on the embedded default corpus (tests/conftest.py builds it once per session),
so no test depends on another having run first. Runs that several test files start from are made once
per session here."""

import sys

import pytest

from tests.distributed.training import REPO, run_cpu


@pytest.fixture(scope="session", autouse=True)
def _every_test_has_the_corpus(default_corpus):
    """tests/conftest.py builds it."""


@pytest.fixture(scope="session")
def megatron_lm_tp1(tmp_path_factory):
    """A genuine Megatron-LM save dir at TP1/PP1 after 2 steps (tests/distributed/worker_megatron_lm.py,
    fully_reshardable optimizer state) and megatron's losses on the next batches (reference.pt), for
    test_import_megatron*.py. Shared: a test that changes it works on a copy."""
    root = tmp_path_factory.mktemp("megatron_lm_tp1")
    run_cpu([sys.executable, str(REPO / "tests" / "distributed" / "worker_megatron_lm.py"), str(root),
             "--dist-ckpt-optim-fully-reshardable"])
    return root
