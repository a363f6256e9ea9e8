"""A distillation stopped by SIGUSR1 (Slurm's time-limit warning): `python -m pipeline.compress distill`
saves the student at the end of the step it was in and exits 0 without DONE; the same command
started again resumes there and ends exactly where an uninterrupted distillation does.

Three processes of the same command: the uninterrupted reference (alongside the others), the one
signalled after its first step, and its restart. All run as subprocesses with one thread each, so
that the restarted half and the reference compute bit for bit alike."""

import re
import signal

import pytest

from pipeline.checkpoint import verify_checkpoint
from tests.distributed.compress_runs import TINY, make_parent, make_student, records
from tests.distributed.training import Trainer

ITERS = 16
"""Steps of each distillation: enough that the signal, sent after step 1, lands well before the end."""


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_signal")
    parent = make_parent(root / "parent")
    student = make_student(parent, root / "student", hidden=range(0, 128, 2))
    command = ("-m", "pipeline.compress", "distill", *TINY, f"train.iters={ITERS}", f"compress.parent={parent}",
               f"compress.student={student}", "compress.lm_weight=0.5")
    reference = Trainer(root / "straight", root / "straight", command=command)
    try:
        first = Trainer(root / "kd", root / "first", command=command)
        first.wait_for_step(1)
        first.proc.send_signal(signal.SIGUSR1)
        stopped = first.wait()
        found = re.search(r"stopping at step (\d+) \(SIGUSR1\)", stopped.stdout)
        step = int(found.group(1)) if found else None
        checkpoints = sorted(p.name for p in (root / "kd" / "checkpoints").glob("step_*"))
        latest = (root / "kd" / "checkpoints" / "latest").read_text().strip()
        train_steps = [r["step"] for r in records(root / "kd", "train")]
        restarted = Trainer(root / "kd", root / "second", command=command).wait()
    finally:
        straight = reference.wait()
    assert straight.returncode == 0, straight.stderr[-3000:]
    return {"dir": root / "kd", "stopped": stopped, "step": step, "checkpoints": checkpoints, "latest": latest,
            "train_steps": train_steps, "restarted": restarted, "reference": root / "straight"}


def test_sigusr1_saves_the_student_at_the_step_it_stopped_and_exits_0(stopped):
    out = stopped["stopped"]
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    step = stopped["step"]
    assert step is not None and 1 <= step < ITERS, f"no stop before step {ITERS}:\n{out.stdout[-2000:]}"
    assert stopped["train_steps"][-1] == step, f"trained past the stop: {stopped['train_steps']}"
    name = f"step_{step:07d}"
    assert stopped["checkpoints"] == [name] and stopped["latest"] == name, stopped["checkpoints"]
    meta = verify_checkpoint(stopped["dir"] / "checkpoints" / name)  # every file present and intact
    assert meta.step == step and meta.model["hidden_size"] == 64, "the saved model is not the student"


def test_restart_resumes_there_and_matches_the_uninterrupted_distillation(stopped):
    out = stopped["restarted"]
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"at step {stopped['step']}" in out.stdout and "resumed from" in out.stdout, out.stdout[-2000:]
    assert (stopped["dir"] / "DONE").exists()
    keys = ("loss", "student_loss", "teacher_loss", "kl")
    resumed = {r["step"]: tuple(r[k] for k in keys) for r in records(stopped["dir"], "train")}
    reference = {r["step"]: tuple(r[k] for k in keys) for r in records(stopped["reference"], "train")}
    assert resumed == reference, f"stopped at {stopped['step']} + restart differs from {ITERS} straight steps"
