"""Test-side API of the fake Slurm: submit a job script, signal it, read what it left behind."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FAKE = Path(__file__).resolve().parent
RECORDING_PYTHON = FAKE / "recording_python"


class JobFiles:
    """Readers of the fake cluster's records of one job (`job_id` under `state`)."""

    job_id: int
    state: Path

    def runs(self) -> list[dict]:
        """One record per start of the batch script: {"restart": n, "exit_code": c}."""
        path = self.state / "jobs" / str(self.job_id) / "runs.jsonl"
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

    def spec(self) -> dict:
        """What the fake sbatch resolved from the directives and the command line."""
        return json.loads((self.state / "jobs" / str(self.job_id) / "spec.json").read_text(encoding="utf-8"))

    def srun_argvs(self) -> list[list[str]]:
        """The argv of every srun the job ran."""
        path = self.state / "jobs" / str(self.job_id) / "srun.jsonl"
        return [json.loads(line)["argv"] for line in path.read_text(encoding="utf-8").splitlines()]


@dataclass
class Job(JobFiles):
    """A job that has ended: its id, exit status and sbatch's output."""

    job_id: int
    returncode: int
    sbatch_output: str
    state: Path


class FakeSlurm:
    """A fake cluster rooted at `state`; jobs are submitted from `submit_dir`, where their Slurm
    output files land (keep it out of the repository)."""

    def __init__(self, state: Path, submit_dir: Path):
        self.state = state
        self.submit_dir = submit_dir

    def env(self, **extra: str) -> dict:
        """The submitting shell's environment: fake Slurm tools first on PATH, then this Python."""
        path = os.pathsep.join([str(FAKE / "bin"), str(Path(sys.executable).parent), os.environ["PATH"]])
        # Variables a cluster shell or the job scripts' settings could leak into a test.
        drop = ("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "CONTAINER_", "PIPELINE_ROOT",
                "RECORDING_PYTHON")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and k != "PYTHON"}
        env.update(PATH=path, FAKE_SLURM_STATE=str(self.state), CUDA_VISIBLE_DEVICES="", **extra)
        return env

    def start(self, script: str, *args: str, options: tuple[str, ...] = (), **env: str) -> "RunningJob":
        """Submit `script` (relative to the repo) with `sbatch --wait --parsable`; return at once."""
        cmd = ["sbatch", "--wait", "--parsable", *options, str(REPO / script), *args]
        proc = subprocess.Popen(
            cmd,
            cwd=self.submit_dir,
            env=self.env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        first = proc.stdout.readline().strip()
        if not first.isdigit():
            out, err = proc.communicate()
            raise AssertionError(f"sbatch refused the job: {first}{out}\n{err}")
        return RunningJob(int(first), proc, self.state)

    def scancel(self, *args: str) -> None:
        """Run the fake scancel (e.g. '--signal=USR1', job id)."""
        subprocess.run(["scancel", *args], env=self.env(), check=True, capture_output=True, text=True)


@dataclass
class RunningJob(JobFiles):
    """A job whose sbatch --wait is still running."""

    job_id: int
    proc: subprocess.Popen
    state: Path

    def wait(self, timeout: float) -> Job:
        """Wait for the job to end; on timeout kill everything it started and fail."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"job {self.job_id} still running after {timeout} s\n{out}\n{err}")
        return Job(self.job_id, self.proc.returncode, out + err, self.state)

    def kill(self) -> None:
        """SIGKILL sbatch and the batch script's process group (each has its own)."""
        batch_pid = self.state / "jobs" / str(self.job_id) / "batch.pid"
        groups = [self.proc.pid] + ([int(batch_pid.read_text())] if batch_pid.exists() else [])
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def metrics(run_dir: Path) -> list[dict]:
    """The training records of run_dir/metrics.jsonl, in order (empty before the first one)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    # The last line may be half written while the job runs: only complete lines count.
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    records = [json.loads(line) for line in lines if line.strip()]
    return [record for record in records if record.get("kind") == "train"]


def wait_for_step(run_dir: Path, step: int, job: RunningJob, timeout: float) -> None:
    """Block until metrics.jsonl has reached `step`; fail if the job ends or time runs out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(record["step"] >= step for record in metrics(run_dir)):
            return
        if job.proc.poll() is not None:
            raise AssertionError(f"job {job.job_id} ended (status {job.proc.returncode}) before step {step}")
        time.sleep(0.05)
    job.kill()
    raise AssertionError(f"job {job.job_id} did not log step {step} within {timeout} s")


def restart_log(run_dir: Path, job_id: int, restart: int) -> Path:
    """The per-restart log the job scripts write into the run directory."""
    return run_dir / "logs" / f"slurm-{job_id}-restart{restart}.out"
