"""The distributed optimizer's save state built by pipeline.checkpoint.optimizer_state equals
megatron-core's own builder bit for bit (at DP 1 and 2, one bucket and many, fp32 and bf16), and
on one rank with one bucket it hands over the optimizer's tensors without copying them."""

import json
from pathlib import Path

import pytest

from tests.distributed.launch import torchrun

WORKER = Path(__file__).with_name("worker_optimizer_state.py")


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    out = tmp_path_factory.mktemp("staging")
    runs = {}
    for dp in (1, 2):
        torchrun(WORKER, dp, str(out / f"dp{dp}.json"))  # the worker raises on the first difference
        runs[dp] = json.loads((out / f"dp{dp}.json").read_text())["runs"]
    return runs


@pytest.mark.parametrize("dp", [1, 2])
def test_every_state_tensor_equals_megatrons(staged, dp):
    for run in staged[dp]:
        assert run["tensors"] == 3 * run["params"] > 0, (
            f"DP={dp} {run}: expected param, exp_avg, exp_avg_sq per parameter"
        )


@pytest.mark.parametrize("dp", [1, 2])
def test_many_bucket_layout_was_exercised(staged, dp):
    assert {run["buckets"] == 1 for run in staged[dp]} == {True, False}, staged[dp]


def test_one_rank_one_bucket_hands_over_the_optimizers_own_tensors(staged):
    for run in staged[1]:
        expected = run["params"] if run["buckets"] == 1 else 0
        assert run["zero_copy"] == expected, f"{run}: parameters saved from the optimizer's own moments"
