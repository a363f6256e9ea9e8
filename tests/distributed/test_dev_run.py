"""The README's main command: `bash launch/local.sh` trains the tiny model on the embedded corpus
(2 CPU processes here), its validation loss falls well below half, and it leaves a checkpoint that a
second invocation resumes from. The wall time is printed (a number to read, not a pass/fail bound).

The run is the dev run shortened to ITERS of its 600 steps (its other settings unchanged): at 400 the
loss is already below half (8.32 -> 3.99; 3.80 after 600), and the test costs 2 minutes less."""

import json
import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ITERS = 400


def _local(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        ["bash", "launch/local.sh", f"run_dir={run_dir}", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, f"launch/local.sh failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_dev_run_learns_and_leaves_a_resumable_checkpoint(tmp_path):
    started = time.perf_counter()
    _local(tmp_path, f"train.iters={ITERS}")
    elapsed = time.perf_counter() - started
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    valid = [r["loss"] for r in rows if r["kind"] == "valid"]
    print(f"\ndev run: {elapsed:.0f} s on {os.cpu_count()} cores; validation loss {valid[0]:.3f} -> {valid[-1]:.3f}")
    assert (tmp_path / "DONE").exists()
    assert valid[-1] < 0.5 * valid[0], f"validation loss only went {valid[0]:.3f} -> {valid[-1]:.3f}"
    final_step = max(r["step"] for r in rows)
    assert final_step == ITERS
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{final_step:07d}"
    again = _local(tmp_path, f"train.iters={final_step + 2}", "train.eval_interval=0")
    assert f"at step {final_step}" in again.stdout, again.stdout[-2000:]
