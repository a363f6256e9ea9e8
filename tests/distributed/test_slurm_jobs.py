"""The job scripts in slurm/ end to end on a fake Slurm (tests/fake_slurm): one table of scenarios, one test.

Each row submits a script with `sbatch --wait`, may signal the job as Slurm does (the time-limit
warning to the training tasks, preemption's SIGTERM to every process of the job), and states what the
job must leave behind: the batch script's exit status at each start (a requeue starts it again), text
in its logs, and for training rows the steps, DONE, the checkpoint and the losses.

Training rows run the real `python -m pipeline.train` (tiny model, 2 fake nodes x 1 CPU task, gloo),
so a resumed run is proven equal to the uninterrupted one, and that one to a `launch/local.sh` run of
the same world size; a launch to the end costs about 25 s on 2 busy cores. Rows of the other stages
give the job scripts tests/fake_slurm/recording_python as their Python and check the command each
task was given: the scripts own that command line, and the entry points have end-to-end tests of
their own (test_compress_*.py, tests/unit/test_data_preprocess.py, test_hf_*.py, test_export_trained.py).
"""

import json
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.distributed.training import BASE, losses
from tests.fake_slurm.harness import RECORDING_PYTHON, REPO, FakeSlurm, Job, metrics, restart_log, wait_for_step

TIMEOUT = 400
"""Seconds one job (all its restarts) may take."""


@dataclass(frozen=True)
class Signal:
    """`scancel --signal` to the job once its run has logged training step `after_step` (restarts included)."""

    after_step: int
    name: str = ""
    """Empty: the signal the job asked for with `#SBATCH --signal` (the time-limit warning)."""
    full: bool = False
    """To every process of the job (batch shell, tee, srun, tasks), as preemption does; else the tasks only."""


@dataclass(frozen=True)
class Call:
    """`python -m module argv...`, run by the tasks with SLURM_PROCID 0..tasks-1 of a step."""

    module: str
    argv: tuple[str, ...]
    tasks: int = 1


@dataclass(frozen=True)
class Scenario:
    """One job submission and what it must leave behind. In `args`, `calls` and the expected texts,
    {run_dir} stands for the row's run directory, {job_id} for its job id and {repo} for the repository."""

    name: str
    script: str
    args: tuple[str, ...]
    options: tuple[str, ...] = ()
    """sbatch options on the command line (they win over the script's #SBATCH lines)."""
    record: bool = False
    """PYTHON is recording_python: each task records its `python -m` command instead of running it."""
    root: str = "repo"
    """PIPELINE_ROOT: "repo"; "slurm only" (a checkout holding slurm/ and nothing else); "" (unset,
    and submitted from outside the repository)."""
    env: tuple[tuple[str, str], ...] = ()
    """More variables of the submitting shell."""
    done_before: bool = False
    """run_dir/DONE exists before the job starts."""
    signals: tuple[Signal, ...] = ()
    exit_codes: tuple[int, ...] = (0,)
    """The batch script's exit status at each start: one start more per requeue."""
    output: tuple[str, ...] = ()
    """Texts in the job's Slurm output file."""
    restart_logs: tuple[tuple[str, ...], ...] = ()
    """Texts in run_dir/logs/slurm-JOB-restartN.out, one tuple per start (scripts that train)."""
    calls: tuple[Call, ...] = ()
    """With `record`: every `python -m` the tasks ran (none when empty)."""
    srun_words: tuple[str, ...] = ()
    """Words in every srun command line of the job."""
    trained: int = 0
    """Steps 1..trained each trained once over all restarts, then DONE and checkpoints/latest."""
    same_losses_as: str = ""
    """Another row's name, or LOCAL_SH: the training losses must equal that run's to the bit."""


LOCAL_SH = "launch/local.sh"
TWO_NODES = ("--nodes=2", "--ntasks-per-node=1")
TRAIN = ("model=tiny", "device=cpu", "train.iters=12", *BASE, "run_dir={run_dir}")
CONVERT = ("export", "/runs/8b", "/hf/8b", "--dtype", "bf16")
PREPROCESS = ("--input", "a.jsonl", "--tokenizer", "tok", "--output", "o")
PER_TASK_SHARD = ("--input", "in/part-{task:03}.jsonl", "--tokenizer", "tok", "--output", "out/web_{task}")
SEARCH = ("search", "compress.parent=/runs/p", "run_dir=/runs/c")
NANO3 = ("model=nemotron3_nano_30b_a3b", "parallel=nemotron3_nano_30b_a3b_16gpu", "precision=fp8_tensorwise",
         "run_dir={run_dir}")


SCENARIOS = [
    Scenario(
        "pretrain_completes",
        "slurm/pretrain.sbatch", TRAIN, TWO_NODES,
        # The config as YAML, both tasks in one world, rendezvous on the first node (fakenode1).
        restart_logs=(("=== pretrain {job_id}, restart 0", "\nrun_dir: {run_dir}\n", "\nmodel:\n", " dp=2 ",
                       "master: 127.0.0.1:", "run complete"),),
        trained=12, same_losses_as=LOCAL_SH,
    ),
    Scenario(
        "pretrain_warned_then_preempted",
        "slurm/pretrain.sbatch", TRAIN, TWO_NODES,
        # Two restarts in one job: the second resumes from a checkpoint written by a resumed run.
        signals=(Signal(after_step=2), Signal(after_step=7, name="TERM", full=True)),
        exit_codes=(0, 0, 0),
        restart_logs=(("(SIGUSR1)", "requeueing"),
                      ("resumed from", "(SIGTERM)", "job script: got SIGTERM", "requeueing"),
                      ("resumed from", "run complete")),
        trained=12, same_losses_as="pretrain_completes",
    ),
    Scenario(
        "pretrain_config_error_not_requeued",
        # One task: of two, the first to exit 2 has srun kill the other, whose 137 would then win.
        "slurm/pretrain.sbatch", (*TRAIN, "train.micro_batch_size=3"), ("--nodes=1", "--ntasks-per-node=1"),
        exit_codes=(2,),
        restart_logs=(("error: train.global_batch_size=8 is not a multiple of train.micro_batch_size=3",
                       "training failed (exit status 2); not requeueing"),),
    ),
    Scenario(
        "pretrain_exit_0_without_checkpoint_not_requeued",
        # The trainer prints its help and exits 0 having saved nothing: a requeue would do so forever.
        "slurm/pretrain.sbatch", ("--help", *TRAIN), TWO_NODES,
        exit_codes=(1,),
        restart_logs=(("without a new checkpoint", "not requeueing"),),
    ),
    Scenario(
        "pretrain_outside_the_repository",
        "slurm/pretrain.sbatch", ("model=tiny",), root="",
        exit_codes=(1,), output=("submit from the repository root or export PIPELINE_ROOT",),
    ),
    Scenario(
        # slurm/README.md's Nemotron 3 Nano example: 2 nodes x 8 GPUs, one rank per GPU, the EP8 layout.
        "pretrain_nemotron3_nano_on_two_nodes",
        "slurm/pretrain.sbatch", NANO3, ("--nodes=2", "--ntasks-per-node=8"), record=True, done_before=True,
        restart_logs=(("=== pretrain {job_id}, restart 0", "run complete"),),
        calls=(Call("pipeline.train", NANO3, tasks=16),),
    ),
    Scenario(
        "convert_forwards_its_arguments",
        "slurm/convert.sbatch", CONVERT, record=True,
        calls=(Call("pipeline.convert", CONVERT),),
        srun_words=("--kill-on-bad-exit=1",),
    ),
    Scenario(
        "convert_in_a_container",
        "slurm/convert.sbatch", CONVERT, record=True, env=(("CONTAINER_IMAGE", "img.sqsh"),),
        calls=(Call("pipeline.convert", CONVERT),),
        srun_words=("--container-image=img.sqsh", "--container-workdir={repo}"),
    ),
    Scenario(
        "preprocess_array_shard_per_task",
        "slurm/preprocess.sbatch", (*PER_TASK_SHARD, "--workers", "2"), ("--array=0-1",), record=True,
        calls=(Call("pipeline.data", ("preprocess", "--input", "in/part-000.jsonl", "--tokenizer", "tok",
                                      "--output", "out/web_0", "--workers", "2")),
               Call("pipeline.data", ("preprocess", "--input", "in/part-001.jsonl", "--tokenizer", "tok",
                                      "--output", "out/web_1", "--workers", "2"))),
    ),
    Scenario(
        "preprocess_workers_default_to_cpus",
        "slurm/preprocess.sbatch", PREPROCESS, ("--cpus-per-task=3",), record=True,
        calls=(Call("pipeline.data", ("preprocess", *PREPROCESS, "--workers", "3")),),
    ),
    Scenario(
        "preprocess_array_without_placeholder",
        "slurm/preprocess.sbatch", PREPROCESS, ("--array=0-1",), record=True,
        exit_codes=(1,), output=("put {task} in --input and --output",),
    ),
    Scenario(
        "preprocess_placeholder_without_array",
        "slurm/preprocess.sbatch", PER_TASK_SHARD, record=True,
        exit_codes=(1,), output=("{task} needs an array job",),
    ),
    Scenario(
        "distill_without_entry_point",
        "slurm/distill.sbatch", ("run_dir=runs/d",), record=True, root="slurm only",
        exit_codes=(1,), output=("compression stage is not available",),
    ),
    Scenario(
        "distill_one_step_on_every_task",
        "slurm/distill.sbatch", SEARCH, ("--nodes=2", "--ntasks-per-node=2"), record=True,
        calls=(Call("pipeline.compress", SEARCH, tasks=4),),
    ),
    Scenario(
        "distill_defaults_to_all_and_stops_at_done",
        "slurm/distill.sbatch", ("compress=minipuzzle", "run_dir={run_dir}"), TWO_NODES, record=True,
        done_before=True,
        restart_logs=(("=== distill {job_id}, restart 0", "run complete", "not requeueing"),),
        calls=(Call("pipeline.compress", ("all", "compress=minipuzzle", "run_dir={run_dir}"), tasks=2),),
    ),
]
BY_NAME = {row.name: row for row in SCENARIOS}


@dataclass
class Outcome:
    """A row's finished job, the fake cluster it ran on and its run directory."""

    job: Job
    slurm: FakeSlurm
    run_dir: Path

    def report(self) -> str:
        """sbatch's output and the tail of every log the job wrote, for assertion messages."""
        logs = sorted(self.slurm.submit_dir.glob("slurm-*.out"))
        if (self.run_dir / "logs").is_dir():
            logs += sorted((self.run_dir / "logs").glob("*.out"))
        return self.job.sbatch_output + "".join(f"\n--- {p.name}\n{p.read_text()[-6000:]}" for p in logs)


def fill(text: str, run_dir: Path, job_id: int | None = None) -> str:
    """`text` with the row placeholders replaced (other braces, such as preprocess's {task}, stay)."""
    text = text.replace("{run_dir}", str(run_dir)).replace("{repo}", str(REPO))
    return text if job_id is None else text.replace("{job_id}", str(job_id))


def submit(row: Scenario, root: Path) -> Outcome:
    """Submit `row`'s job on the fake cluster under `root`, signal it as the row says, wait for its end."""
    slurm = FakeSlurm(state=root / "state", submit_dir=root / row.name)
    slurm.submit_dir.mkdir()
    run_dir = slurm.submit_dir / "run"
    if row.done_before:
        run_dir.mkdir()
        (run_dir / "DONE").write_text("10\n")
    env = dict(row.env, PYTHON=str(RECORDING_PYTHON) if row.record else sys.executable)
    if row.record:
        env["RECORDING_PYTHON_LOG"] = str(slurm.submit_dir / "calls.jsonl")
    if row.root == "repo":
        env["PIPELINE_ROOT"] = str(REPO)
    elif row.root == "slurm only":
        shutil.copytree(REPO / "slurm", slurm.submit_dir / "checkout" / "slurm")
        env["PIPELINE_ROOT"] = str(slurm.submit_dir / "checkout")
    running = slurm.start(row.script, *(fill(arg, run_dir) for arg in row.args), options=row.options, **env)
    for sig in row.signals:
        wait_for_step(run_dir, sig.after_step, running, TIMEOUT)
        name = sig.name or running.spec()["signal"]["signal"]
        slurm.scancel(f"--signal={name}", *(["--full"] if sig.full else []), str(running.job_id))
    return Outcome(running.wait(TIMEOUT), slurm, run_dir)


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    """Row -> its Outcome; each row's job runs once per module, when a test first needs it."""
    root = tmp_path_factory.mktemp("slurm")
    done = {}

    def get(row: Scenario) -> Outcome:
        if row.name not in done:
            done[row.name] = submit(row, root)
        return done[row.name]

    return get


def reference_losses(row: Scenario, outcome) -> dict[int, float]:
    """The training losses `row` must reproduce (Scenario.same_losses_as)."""
    if row.same_losses_as != LOCAL_SH:
        return losses(outcome(BY_NAME[row.same_losses_as]).run_dir)
    # torchrun --standalone with 2 processes, in the environment the job was submitted from.
    local = outcome(row).slurm.submit_dir / "local"
    env = outcome(row).slurm.env(NPROC="2", PIPELINE_PYTHON=sys.executable)
    proc = subprocess.run(["bash", LOCAL_SH, *(fill(arg, local) for arg in row.args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return losses(local)


def recorded_calls(submit_dir: Path) -> Counter:
    """(module, argv, SLURM_PROCID) of every task's `python -m` under recording_python."""
    path = submit_dir / "calls.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return Counter((r["module"], tuple(r["argv"]), r["slurm_procid"]) for r in records)


def param(row: Scenario):
    """The row as a test case; rows that start the real trainer are slow."""
    trains = not row.record and row.root == "repo"
    return pytest.param(row, id=row.name, marks=[pytest.mark.slow] if trains else [])


@pytest.mark.parametrize("row", [param(row) for row in SCENARIOS])
def test_job(row: Scenario, outcome):
    done = outcome(row)
    job, run_dir, why = done.job, done.run_dir, done.report()

    def text(template: str) -> str:
        return fill(template, run_dir, job.job_id)

    starts = [(run["restart"], run["exit_code"]) for run in job.runs()]
    assert starts == list(enumerate(row.exit_codes)) and job.returncode == row.exit_codes[-1], why
    slurm_output = "".join(p.read_text() for p in done.slurm.submit_dir.glob("slurm-*.out"))
    for expected in row.output:
        assert text(expected) in slurm_output, why
    for restart, expected in enumerate(row.restart_logs):
        log = restart_log(run_dir, job.job_id, restart).read_text()
        assert all(text(t) in log for t in expected), f"restart {restart} should log {expected}\n{why}"
    assert not row.restart_logs or not restart_log(run_dir, job.job_id, len(row.restart_logs)).exists(), why
    if row.record:
        expected = Counter((c.module, tuple(map(text, c.argv)), str(t)) for c in row.calls for t in range(c.tasks))
        assert recorded_calls(done.slurm.submit_dir) == expected, why
    for argv in job.srun_argvs() if row.srun_words else ():
        assert {text(word) for word in row.srun_words} <= set(argv), argv
    if row.trained:
        steps = [record["step"] for record in metrics(run_dir)]
        assert steps == list(range(1, row.trained + 1)), f"each step trained once over the restarts: {steps}\n{why}"
        assert (run_dir / "DONE").exists() and (run_dir / "checkpoints" / "latest").exists(), why
    if row.same_losses_as:
        assert losses(run_dir) == reference_losses(row, outcome)
