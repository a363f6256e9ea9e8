"""Monitoring sinks switched on as a user would: W&B (offline, no API key) and TensorBoard, through the
trainer, across a resume."""

import json
import os
from pathlib import Path

from tests.distributed.training import losses, train

ITERS = ["train.iters=6", "logging.wandb=true", "logging.tensorboard=true"]


def _scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_wandb_and_tensorboard_through_a_resumed_run(tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)  # no API key, no mode: the trainer must choose offline itself
    first = train(tmp_path, 1, *ITERS, "train.exit_after_steps=3")
    assert "stopping at step 3" in first.stdout
    second = train(tmp_path, 1, *ITERS)
    assert "resumed from" in second.stdout

    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, f"expected one offline W&B run per invocation, found {[r.name for r in runs]}"
    assert all(r.name.endswith(f"-{run_id}") for r in runs), f"resume did not reuse W&B run id {run_id}: {runs}"
    for r in runs:
        history = (r / f"run-{run_id}.wandb").read_bytes()
        assert b"train/loss" in history, f"{r} holds no logged train/loss"

    jsonl = losses(tmp_path)
    board = _scalars(tmp_path, "train/loss")
    assert [s for s, _ in board] == sorted(jsonl), f"TensorBoard steps {board} != JSONL steps {sorted(jsonl)}"
    for step, value in board:
        assert abs(value - jsonl[step]) <= 1e-6 * abs(jsonl[step]), (step, value, jsonl[step])
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 6
