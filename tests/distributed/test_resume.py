"""Checkpoints: exact resume, resume at another TP layout, and a save killed half-way (the stopped run's
restart is the one whose save is killed)."""

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


@pytest.fixture(scope="module")
def stopped_then_killed(tmp_path_factory):
    """One run directory at TP=1: stopped cleanly after step 10; restarted with saves every 5 steps and
    killed during the save of step 15 (before its commit); started again to the end. The state after
    each start is recorded."""
    run_dir = tmp_path_factory.mktemp("stopped_then_killed")
    checkpoints = run_dir / "checkpoints"
    out = {"dir": run_dir, "stopped": train(run_dir, 1, *ITERS, "train.exit_after_steps=10")}
    out["done_after_stop"] = (run_dir / "DONE").exists()
    out["killed"] = train(run_dir, 1, *ITERS, "checkpoint.save_interval=5",
                          env=fault_env("checkpoint-before-commit@step_0000015"), check=False)
    out["latest_after_kill"] = (checkpoints / "latest").read_text().strip()
    out["left_after_kill"] = sorted(p.name for p in checkpoints.iterdir() if "step_0000015" in p.name)
    out["again"] = train(run_dir, 1, *ITERS, "checkpoint.save_interval=5")
    out["left_at_end"] = sorted(p.name for p in checkpoints.iterdir() if p.name.startswith(".tmp-"))
    return out


def test_resume_continues_bit_exactly(straight, stopped_then_killed):
    run = stopped_then_killed
    assert "stopping at step 10" in run["stopped"].stdout
    assert not run["done_after_stop"], "a run stopped early must not look finished"
    assert "resumed from" in run["killed"].stdout and "at step 10" in run["killed"].stdout
    assert (run["dir"] / "DONE").exists()
    assert losses(run["dir"]) == straight[1], "10 steps + resume + 10 steps differs from 20 straight"


def test_checkpoint_from_tp2_resumes_at_tp1(straight, tmp_path):
    train(tmp_path, 2, *ITERS, "parallel.tp=2", "train.exit_after_steps=10")
    second = train(tmp_path, 1, *ITERS, "parallel.tp=1")
    assert "saved at tp=2" in second.stdout
    resumed = {s: v for s, v in losses(tmp_path).items() if s > 10}
    reference = {s: v for s, v in straight[2].items() if s > 10}
    diff = max_rel_diff(resumed, reference)
    assert diff <= 1e-5, f"TP=2 -> TP=1 resume drifts from the TP=2 run by {diff:.2e}"


def test_killed_save_leaves_previous_checkpoint_usable(straight, stopped_then_killed):
    run = stopped_then_killed
    assert run["killed"].returncode != 0, "the fault hook should have killed the save at step 15"
    assert run["latest_after_kill"] == "step_0000010"
    assert run["left_after_kill"] == [".tmp-step_0000015"], (
        "the interrupted save should be left as a temporary, and only as one")
    assert "at step 10" in run["again"].stdout
    assert run["left_at_end"] == [], "stale temporaries are cleaned up"
    assert losses(run["dir"]) == straight[1]
