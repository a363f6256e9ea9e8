"""GPU: a checkpoint saved in the background (checkpoint.async_save, the default) while training goes
on holds the state of its step: resuming from it gives the losses of the uninterrupted run. On the
GPU the optimizer state is handed to the writer without a copy (pipeline/checkpoint/optimizer_state.py)
and staged to pinned host memory before the next step; this shows the steps after the save did not
leak into it. Skipped without CUDA.

    python -m pytest tests/gpu/test_background_save.py -s
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("default_corpus"),
]

STEPS, SAVED = 8, 4


def _train(run_dir: Path) -> dict[int, float]:
    from pipeline.config import load_run_config
    from pipeline.training.loop import train

    train(load_run_config([
        "precision=bf16", f"train.iters={STEPS}", "train.seq_length=512", "train.micro_batch_size=2",
        "train.global_batch_size=8", "train.eval_interval=0", "logging.interval=1", "optim.warmup_iters=2",
        f"checkpoint.save_interval={SAVED}", "checkpoint.async_save=true", f"run_dir={run_dir}",
    ]))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def test_resume_from_a_background_save_matches_the_uninterrupted_run(tmp_path):
    straight = _train(tmp_path)
    saves = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    saves = [r for r in saves if r["kind"] == "checkpoint"]
    assert [r["saved_step"] for r in saves] == [SAVED, STEPS], saves
    # As if the run had died after step SAVED's save was committed: that checkpoint is the newest.
    checkpoints = tmp_path / "checkpoints"
    shutil.rmtree(checkpoints / f"step_{STEPS:07d}")
    (checkpoints / "latest").write_text(f"step_{SAVED:07d}\n")
    (tmp_path / "DONE").unlink()
    (tmp_path / "metrics.jsonl").rename(tmp_path / "metrics-straight.jsonl")
    resumed = _train(tmp_path)
    diff = max(abs(resumed[s] - straight[s]) for s in range(SAVED + 1, STEPS + 1))
    print(f"\nbackground save at step {SAVED}: stall {saves[0]['stall_s']:.2f} s, write {saves[0]['write_s']:.2f} s; "
          f"resumed steps {SAVED + 1}-{STEPS} vs uninterrupted: max |loss diff| {diff:.2e}")
    assert sorted(resumed) == list(range(SAVED + 1, STEPS + 1)), f"resumed run logged steps {sorted(resumed)}"
    assert diff == 0.0, f"resumed losses {resumed} differ from the uninterrupted run's {straight}"
