"""slurm/pretrain.sbatch with the real `python -m pipeline.train` on a fake Slurm: 2 nodes x 1 task, gloo.

Same config and world size as a `launch/local.sh` run (torchrun --standalone, 2 CPU processes), so the
losses must be the same; then the time-limit warning mid-run must checkpoint, requeue and resume to
the uninterrupted run's losses. About a minute per training launch on 2 busy cores.
"""

import subprocess
import sys

import pytest

from tests.distributed.training import BASE, losses
from tests.fake_slurm.harness import REPO, FakeSlurm, Job, RunningJob, metrics, restart_log, wait_for_step

pytestmark = pytest.mark.slow

TWO_NODES = ("--nodes=2", "--ntasks-per-node=1")
RUN = ("model=tiny", "device=cpu", "train.iters=12", *BASE)
TIMEOUT = 400


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> FakeSlurm:
    root = tmp_path_factory.mktemp("slurm")
    return FakeSlurm(state=root / "state", submit_dir=root)


def start_pretrain(slurm: FakeSlurm, name: str) -> RunningJob:
    return slurm.start(
        "slurm/pretrain.sbatch",
        f"run_dir={name}",
        *RUN,
        options=TWO_NODES,
        PIPELINE_ROOT=str(REPO),
        PYTHON=sys.executable,
    )


def report(job: Job, run_dir) -> str:
    """sbatch's output and the tail of every log the job left in run_dir, for assertion messages."""
    logs = sorted((run_dir / "logs").glob("*.out")) if (run_dir / "logs").is_dir() else []
    return job.sbatch_output + "".join(f"\n--- {p.name}\n{p.read_text()[-6000:]}" for p in logs)


@pytest.fixture(scope="module")
def completed(slurm):
    run_dir = slurm.submit_dir / "completed"
    job = start_pretrain(slurm, "completed").wait(TIMEOUT)
    assert job.returncode == 0, report(job, run_dir)
    return job, run_dir


@pytest.fixture(scope="module")
def preempted(slurm):
    run_dir = slurm.submit_dir / "preempted"
    running = start_pretrain(slurm, "preempted")
    wait_for_step(run_dir, 2, running, timeout=TIMEOUT)
    slurm.scancel(f"--signal={running.spec()['signal']['signal']}", str(running.job_id))
    job = running.wait(TIMEOUT)
    assert job.returncode == 0, report(job, run_dir)
    return job, run_dir


def test_pretrain_job_trains_and_checkpoints(completed):
    job, run_dir = completed
    assert (run_dir / "DONE").exists(), report(job, run_dir)
    assert (run_dir / "checkpoints" / "latest").exists(), report(job, run_dir)
    assert sorted(losses(run_dir)) == list(range(1, 13)), report(job, run_dir)


def test_job_log_starts_with_the_resolved_config(completed):
    job, run_dir = completed
    lines = restart_log(run_dir, job.job_id, 0).read_text().splitlines()
    # The trainer prints the config as YAML: top-level keys on lines of their own.
    assert f"run_dir: {run_dir}" in lines and "model:" in lines, "\n".join(lines[-80:])


def test_completed_job_is_not_requeued(completed):
    job, run_dir = completed
    assert job.runs() == [{"restart": 0, "exit_code": 0}], report(job, run_dir)


def test_loss_matches_local_sh_with_the_same_world_size(completed, slurm, tmp_path):
    _, run_dir = completed
    local = tmp_path / "local"
    env = slurm.env(NPROC="2", PIPELINE_PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", "launch/local.sh", *RUN, f"run_dir={local}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert losses(run_dir) == losses(local)


def test_warning_signal_checkpoints_and_requeues_once(preempted):
    job, run_dir = preempted
    assert job.runs() == [{"restart": 0, "exit_code": 0}, {"restart": 1, "exit_code": 0}], report(job, run_dir)
    assert "requeueing" in restart_log(run_dir, job.job_id, 0).read_text(), report(job, run_dir)


def test_requeued_job_resumes_from_the_checkpoint(preempted):
    job, run_dir = preempted
    steps = [record["step"] for record in metrics(run_dir)]
    assert steps == list(range(1, 13)), f"each step should be trained once across the restart: {steps}"


def test_resumed_run_ends_with_the_uninterrupted_losses(preempted, completed):
    (_, resumed), (_, uninterrupted) = preempted, completed
    assert losses(resumed) == losses(uninterrupted)
