"""Fixtures for every unit test."""

import sys

import pytest


@pytest.fixture(autouse=True)
def fresh_moe_metrics_tracker():
    """megatron-core's MoE metrics tracker is a process-wide singleton whose per-layer sums are sized
    by the first model that records into it (moe/moe_logging.py); unit tests build MoE models of
    different depths in one process, so each starts with none (left alone until megatron is imported)."""
    moe_logging = sys.modules.get("megatron.core.transformer.moe.moe_logging")
    if moe_logging is not None:
        moe_logging.destroy_moe_metrics_tracker()
    yield
