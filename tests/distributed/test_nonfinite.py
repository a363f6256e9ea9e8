"""Non-finite losses: the step is skipped and logged; K in a row stop the run with a message."""

import json

from tests.distributed.training import train


def test_diverging_run_skips_steps_then_stops(tmp_path):
    # An absurd learning rate turns the weights to ~1e30 after the first update, so every later
    # forward overflows: a deterministic way to get non-finite losses from the real loop.
    proc = train(
        tmp_path, 1, "train.iters=10", "optim.lr=1e30", "optim.min_lr=0", "optim.warmup_iters=0",
        "optim.clip_grad=0", "train.max_nonfinite_steps=3", check=False,
    )
    assert proc.returncode != 0, "the run should stop after 3 non-finite steps in a row"
    assert "3 steps in a row with a non-finite loss or gradient" in proc.stderr + proc.stdout
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["skipped_steps"] for r in rows if r["kind"] == "train"]
    assert skipped[-1] == 3 and skipped[0] == 0, f"skipped_steps logged per step: {skipped}"
    assert not (tmp_path / "DONE").exists()
