"""Faults around a real trainer process: a second trainer on the same run_dir, Ctrl-C, a changed
learning rate on resume, a full disk during a save, a damaged newest checkpoint and a crafted one.

One trainer runs until Ctrl-C while a second is started on its run_dir; the later cases start from
copies of what it left (checkpoints every 2 steps, the last at the Ctrl-C step).
"""

import json
import pickle
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from pipeline.checkpoint import fingerprint
from tests.distributed.training import Trainer, losses
from tests.fault_injection import fault_env

RUN = ("train.iters=1000", "checkpoint.save_interval=2", "train.eval_interval=1000", "train.eval_iters=2")
NEW_LR = 1.0e-4
CONSTANT_LR = ("optim.schedule=constant", "optim.warmup_iters=0")


def records(run_dir: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def newest(run_dir: Path, n: int = 0) -> Path:
    return sorted((run_dir / "checkpoints").glob("step_*"))[-1 - n]


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, f"exit {proc.returncode}, stderr:\n{proc.stderr[-3000:]}"
    return errors[0]


@pytest.fixture(scope="module")
def owned(tmp_path_factory):
    """Trainer A on run_dir; B started on the same run_dir once A trains; then Ctrl-C to A."""
    root = tmp_path_factory.mktemp("owned")
    run_dir = root / "run"
    first = Trainer(run_dir, root / "a", *RUN, *CONSTANT_LR)
    try:
        first.wait_for_step(2)
        config_before = (run_dir / "config.yaml").read_bytes()
        second = Trainer(run_dir, root / "b", *RUN, *CONSTANT_LR).wait()
        config_after = (run_dir / "config.yaml").read_bytes()
        first.wait_for_step(max(losses(run_dir)) + 1)  # A kept training while B was refused
    finally:
        first.proc.send_signal(signal.SIGINT)
    done = first.wait()
    assert done.returncode == 0, f"Ctrl-C should save and exit 0\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return {"dir": run_dir, "first": done, "pid": first.proc.pid, "second": second,
            "config_unchanged": config_before == config_after}


def test_second_trainer_on_a_run_dir_is_refused_naming_the_holder(owned):
    line = one_error_line(owned["second"])
    assert "in use by another run" in line and f"pid {owned['pid']}" in line, line


def test_refused_trainer_leaves_the_first_ones_files_intact(owned):
    steps = [r["step"] for r in records(owned["dir"], "train")]
    assert steps == list(range(1, steps[-1] + 1)), f"each step logged once, in order: {steps}"
    assert owned["config_unchanged"], "the refused trainer rewrote config.yaml"


def test_ctrl_c_saves_a_checkpoint_at_the_step_it_stopped(owned):
    last = max(losses(owned["dir"]))
    assert f"stopping at step {last} (SIGINT)" in owned["first"].stdout, owned["first"].stdout[-2000:]
    assert (owned["dir"] / "checkpoints" / "latest").read_text().strip() == f"step_{last:07d}"
    assert not (owned["dir"] / "DONE").exists()


def test_validation_says_how_many_tokens_it_averaged(owned):
    (valid,) = records(owned["dir"], "valid")
    assert (valid["windows"], valid["tokens"]) == (2 * 8, 2 * 8 * 128), valid


@pytest.fixture(scope="module")
def new_lr_then_full_disk(owned, tmp_path_factory):
    """Resume a copy with another optim.lr for 2 steps; the save after them hits a full disk."""
    root = tmp_path_factory.mktemp("lr")
    run_dir = shutil.copytree(owned["dir"], root / "run")
    start = max(losses(run_dir))
    proc = Trainer(run_dir, root / "log", f"train.iters={start + 2}", f"optim.lr={NEW_LR}", f"optim.min_lr={NEW_LR}",
                   *CONSTANT_LR, env=fault_env(f"disk-full@step_{start + 2:07d}")).wait()
    return {"dir": run_dir, "start": start, "proc": proc}


def test_resume_with_a_changed_lr_continues_with_the_new_lr(new_lr_then_full_disk):
    run = new_lr_then_full_disk
    resumed = [r for r in records(run["dir"], "train") if r["step"] > run["start"]]
    assert [r["lr"] for r in resumed] == [NEW_LR, NEW_LR], f"{resumed}\n{run['proc'].stderr[-3000:]}"
    assert "optim.lr 0.003 -> 0.0001" in run["proc"].stdout, run["proc"].stdout[-2000:]


def test_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(new_lr_then_full_disk):
    run = new_lr_then_full_disk
    line = one_error_line(run["proc"])
    assert "disk full" in line and str(run["dir"] / "checkpoints") in line, line
    assert (run["dir"] / "checkpoints" / "latest").read_text().strip() == f"step_{run['start']:07d}"
    assert not list((run["dir"] / "checkpoints").glob(".tmp-*")), "the half-written save was left behind"


def test_damaged_newest_checkpoint_falls_back_with_a_warning(owned, tmp_path):
    run_dir = shutil.copytree(owned["dir"], tmp_path / "run")
    damaged, previous = newest(run_dir), newest(run_dir, 1)
    shard = damaged / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = Trainer(run_dir, tmp_path / "log", f"train.iters={int(previous.name[5:]) + 1}").wait()
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING:") and str(damaged) in line]
    assert warnings and "truncated" in warnings[0], proc.stderr[-3000:]
    assert f"resumed from {previous} at step {int(previous.name[5:])}" in proc.stdout, proc.stdout[-2000:]


class _RunsCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_crafted_metadata_is_refused_and_does_not_run(owned, tmp_path):
    run_dir = shutil.copytree(owned["dir"], tmp_path / "run")
    marker = tmp_path / "pwned"
    step = newest(run_dir)
    (step / ".metadata").write_bytes(pickle.dumps(_RunsCommand(marker)))
    meta = json.loads((step / "meta.json").read_text())
    meta["files"][".metadata"] = fingerprint(step / ".metadata")  # as a careful attacker would
    (step / "meta.json").write_text(json.dumps(meta))
    proc = Trainer(run_dir, tmp_path / "log", f"train.iters={int(step.name[5:]) + 1}").wait()
    line = one_error_line(proc)
    assert str(step / ".metadata") in line and "posix.system" in line and "allow-list" in line, line
    assert not marker.exists(), "the pickled command ran"


@pytest.mark.parametrize("name", ["metrics.jsonl", "config.yaml"])
def test_a_full_disk_outside_the_checkpoint_is_one_line(tmp_path, name):
    # /dev/full refuses every write with ENOSPC: metrics (the trainer's own writer) and config.yaml (the
    # run dir, written by the loop) end the run with one line, exit 2, like a full disk under a save.
    # (A failed write() names no file: only the metrics writer, which knows its file, names it.)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / name).symlink_to("/dev/full")
    proc = Trainer(run_dir, tmp_path / "log", "train.iters=2", "logging.interval=1").wait()
    line = one_error_line(proc)
    assert "disk full" in line and (name in line or name == "config.yaml"), line
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
