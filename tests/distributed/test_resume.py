"""Checkpoints: exact resume, resume at another TP layout, and a save killed half-way."""

from pathlib import Path

import pytest

from tests.distributed.training import losses, max_rel_diff, train
from tests.fault_injection import fault_env

ITERS = ["train.iters=20"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """20 uninterrupted steps at TP=1 and at TP=2."""
    out = {}
    for tp in (1, 2):
        run_dir = tmp_path_factory.mktemp(f"straight_tp{tp}")
        train(run_dir, tp, *ITERS, f"parallel.tp={tp}")
        out[tp] = losses(run_dir)
    return out


def test_resume_continues_bit_exactly(straight, tmp_path):
    first = train(tmp_path, 1, *ITERS, "train.exit_after_steps=10")
    assert "stopping at step 10" in first.stdout
    assert not (tmp_path / "DONE").exists(), "a run stopped early must not look finished"
    second = train(tmp_path, 1, *ITERS)
    assert "resumed from" in second.stdout and "at step 10" in second.stdout
    assert (tmp_path / "DONE").exists()
    assert losses(tmp_path) == straight[1], "10 steps + resume + 10 steps differs from 20 straight"


def test_checkpoint_from_tp2_resumes_at_tp1(straight, tmp_path):
    train(tmp_path, 2, *ITERS, "parallel.tp=2", "train.exit_after_steps=10")
    second = train(tmp_path, 1, *ITERS, "parallel.tp=1")
    assert "saved at tp=2" in second.stdout
    resumed = {s: v for s, v in losses(tmp_path).items() if s > 10}
    reference = {s: v for s, v in straight[2].items() if s > 10}
    diff = max_rel_diff(resumed, reference)
    assert diff <= 1e-5, f"TP=2 -> TP=1 resume drifts from the TP=2 run by {diff:.2e}"


def test_killed_save_leaves_previous_checkpoint_usable(straight, tmp_path):
    killed = train(
        tmp_path, 1, *ITERS, "checkpoint.save_interval=5",
        env=fault_env("checkpoint-before-commit@step_0000010"), check=False,
    )
    assert killed.returncode != 0, "the fault hook should have killed the save at step 10"
    checkpoints = Path(tmp_path) / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_0000005"
    assert (checkpoints / ".tmp-step_0000010").exists(), "the interrupted save should be left as a temporary"
    assert not (checkpoints / "step_0000010").exists()
    again = train(tmp_path, 1, *ITERS, "checkpoint.save_interval=5")
    assert "at step 5" in again.stdout
    assert not (checkpoints / ".tmp-step_0000010").exists(), "stale temporaries are cleaned up"
    assert losses(tmp_path) == straight[1]
