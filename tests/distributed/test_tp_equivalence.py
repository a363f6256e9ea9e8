"""Tensor parallelism on CPU (gloo): TP=2 computes what TP=1 computes, from the same initial weights."""

from pathlib import Path

import pytest
import torch

from tests.distributed.launch import torchrun

WORKER = Path(__file__).with_name("worker_tp_grads.py")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    torchrun(WORKER, 1, str(out / "tp1.pt"), "parallel.tp=1")
    torchrun(WORKER, 2, str(out / "tp2.pt"), "parallel.tp=2")
    return torch.load(out / "tp1.pt"), torch.load(out / "tp2.pt")


def test_initial_weights_do_not_depend_on_tp(tp_runs):
    tp1, tp2 = tp_runs
    assert tp1["params"].keys() == tp2["params"].keys()
    for name, p1 in tp1["params"].items():
        assert torch.equal(p1, tp2["params"][name]), f"{name} differs between TP=1 and TP=2 at init"


def test_loss_matches_between_tp1_and_tp2(tp_runs):
    tp1, tp2 = tp_runs
    assert _rel(tp2["loss"], tp1["loss"]) <= 1e-5, (tp1["loss"], tp2["loss"])


def test_gradients_match_between_tp1_and_tp2(tp_runs):
    tp1, tp2 = tp_runs
    bad = {n: _rel(tp2["grads"][n], g) for n, g in tp1["grads"].items() if _rel(tp2["grads"][n], g) > 1e-5}
    assert not bad, f"gradients differ (relative error) between TP=1 and TP=2: {bad}"
