"""slurm/pretrain.sbatch end to end on a fake Slurm (2 nodes x 1 task, gloo), with the stand-in trainer.

The stand-in (tests/fake_slurm/trainer.py) keeps pipeline.train's launch contract and trains in a
second, so these tests pin the job script's behaviour: ranks and rendezvous from srun, logs per
restart, checkpoint-and-requeue on the warning signal, no requeue when done or failed.
test_slurm_trainer.py runs the same job with the real trainer.
"""

import subprocess
import sys

import pytest

from tests.fake_slurm.harness import (
    REPO,
    STANDIN_PYTHON,
    FakeSlurm,
    Job,
    RunningJob,
    losses_by_step,
    metrics,
    restart_log,
    wait_for_step,
)

pytestmark = pytest.mark.slow

TWO_NODES = ("--nodes=2", "--ntasks-per-node=1")
RUN = ("train.iters=12", "train.seed=7")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> FakeSlurm:
    root = tmp_path_factory.mktemp("slurm")
    return FakeSlurm(state=root / "state", submit_dir=root)


def start_pretrain(slurm: FakeSlurm, name: str, *extra: str) -> RunningJob:
    return slurm.start(
        "slurm/pretrain.sbatch",
        f"run_dir={name}",
        *RUN,
        *extra,
        options=TWO_NODES,
        PIPELINE_ROOT=str(REPO),
        PYTHON=str(STANDIN_PYTHON),
    )


def report(job: Job, run_dir) -> str:
    """sbatch's output and every log the job left in run_dir, for assertion messages."""
    logs = sorted((run_dir / "logs").glob("*.out")) if (run_dir / "logs").is_dir() else []
    return job.sbatch_output + "".join(f"\n--- {p.name}\n{p.read_text()}" for p in logs)


@pytest.fixture(scope="module")
def completed(slurm):
    job = start_pretrain(slurm, "completed", "standin.step_seconds=0").wait(timeout=120)
    run_dir = slurm.submit_dir / "completed"
    assert job.returncode == 0, report(job, run_dir)
    return job, run_dir


@pytest.fixture(scope="module")
def preempted(slurm):
    running = start_pretrain(slurm, "preempted", "standin.step_seconds=0.2")
    run_dir = slurm.submit_dir / "preempted"
    wait_for_step(run_dir, 3, running, timeout=60)
    declared = running.spec()["signal"]["signal"]
    slurm.scancel(f"--signal={declared}", str(running.job_id))
    job = running.wait(timeout=120)
    assert job.returncode == 0, report(job, run_dir)
    return job, run_dir


def test_job_on_two_nodes_finishes_and_checkpoints(completed):
    job, run_dir = completed
    assert (run_dir / "DONE").exists(), report(job, run_dir)
    assert (run_dir / "checkpoints" / "latest").exists(), report(job, run_dir)


def test_job_log_in_run_dir_has_header_and_resolved_config(completed):
    job, run_dir = completed
    log = restart_log(run_dir, job.job_id, 0).read_text()
    assert f"pretrain {job.job_id}, restart 0" in log, log
    assert "resolved config:" in log and '"world_size": 2' in log, log


def test_rendezvous_is_the_first_node_of_the_job(completed, slurm):
    job, run_dir = completed
    nodelist = f"fakenode[1-{job.spec()['nodes']}]"
    first = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], env=slurm.env(), capture_output=True, text=True, check=True
    ).stdout.split()[0]
    log = restart_log(run_dir, job.job_id, 0).read_text()
    assert f"master: {first}:" in log, log


def test_completed_run_is_not_requeued(completed):
    job, run_dir = completed
    assert job.runs() == [{"restart": 0, "exit_code": 0}], report(job, run_dir)
    assert not restart_log(run_dir, job.job_id, 1).exists()


def test_loss_matches_torchrun_standalone_with_same_world_size(completed, slurm, tmp_path):
    job, run_dir = completed
    local = tmp_path / "local"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "tests" / "fake_slurm" / "trainer.py"),
        f"run_dir={local}",
        *RUN,
        "standin.step_seconds=0",
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=slurm.env(OMP_NUM_THREADS="1")
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert losses_by_step(run_dir) == losses_by_step(local)


def test_warning_signal_requeues_the_job_once(preempted):
    job, run_dir = preempted
    assert job.runs() == [{"restart": 0, "exit_code": 0}, {"restart": 1, "exit_code": 0}], report(job, run_dir)
    assert restart_log(run_dir, job.job_id, 1).exists(), report(job, run_dir)


def test_requeued_run_resumes_instead_of_starting_over(preempted):
    job, run_dir = preempted
    steps = [record["step"] for record in metrics(run_dir)]
    assert steps == list(range(1, 13)), f"each step should be trained once across the restart: {steps}"


def test_resumed_run_ends_with_the_uninterrupted_loss(preempted, completed):
    (_, resumed), (_, uninterrupted) = preempted, completed
    assert losses_by_step(resumed) == losses_by_step(uninterrupted)


def test_sigterm_to_every_process_checkpoints_and_requeues(slurm, completed):
    running = start_pretrain(slurm, "sigterm", "standin.step_seconds=0.2")
    run_dir = slurm.submit_dir / "sigterm"
    wait_for_step(run_dir, 3, running, timeout=60)
    slurm.scancel("--signal=TERM", "--full", str(running.job_id))
    job = running.wait(timeout=120)
    assert job.returncode == 0, report(job, run_dir)
    assert [run["restart"] for run in job.runs()] == [0, 1], report(job, run_dir)
    assert "got SIGTERM" in restart_log(run_dir, job.job_id, 0).read_text(), "the batch shell's log lost the signal"
    assert losses_by_step(run_dir) == losses_by_step(completed[1])


def test_failed_training_is_not_requeued(slurm):
    job = start_pretrain(slurm, "failing", "standin.fail_at_step=2").wait(timeout=120)
    run_dir = slurm.submit_dir / "failing"
    assert job.returncode != 0, report(job, run_dir)
    assert len(job.runs()) == 1, report(job, run_dir)


def test_early_stop_without_new_checkpoint_is_not_requeued(slurm):
    job = start_pretrain(slurm, "stalled", "standin.quit_at_step=3").wait(timeout=120)
    run_dir = slurm.submit_dir / "stalled"
    assert job.returncode == 1, report(job, run_dir)
    assert len(job.runs()) == 1, report(job, run_dir)
    assert "without a new checkpoint" in restart_log(run_dir, job.job_id, 0).read_text()
