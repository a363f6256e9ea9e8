"""The non-training job scripts on a fake Slurm: what they pass to their entry points, and their errors.

The entry points are replaced by a recorder (tests/fake_slurm/standin_python with STANDIN_ARGV_LOG),
so these tests see the exact argv each job script hands to `python -m ...` under srun.
"""

import json
import shutil

import pytest

from tests.fake_slurm.harness import REPO, STANDIN_PYTHON, FakeSlurm, Job


@pytest.fixture
def slurm(tmp_path) -> FakeSlurm:
    return FakeSlurm(state=tmp_path / "state", submit_dir=tmp_path)


def submit(slurm: FakeSlurm, script: str, *args: str, options: tuple[str, ...] = (), root=REPO, image: str = "") -> Job:
    return slurm.submit(
        script,
        *args,
        options=options,
        timeout=60,
        PIPELINE_ROOT=str(root),
        CONTAINER_IMAGE=image,
        PYTHON=str(STANDIN_PYTHON),
        STANDIN_ARGV_LOG=str(slurm.submit_dir / "argv.jsonl"),
    )


def recorded(slurm: FakeSlurm) -> list[dict]:
    """What the entry points were called with: {"module", "argv", "slurm_procid"} per call."""
    path = slurm.submit_dir / "argv.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def job_output(slurm: FakeSlurm, job: Job, name: str) -> str:
    return (slurm.submit_dir / f"slurm-{name}-{job.job_id}.out").read_text()


def test_convert_forwards_its_arguments_under_srun(slurm):
    args = ("export", "/runs/8b", "/hf/8b", "--dtype", "bf16")
    job = submit(slurm, "slurm/convert.sbatch", *args)
    assert job.returncode == 0, job_output(slurm, job, "convert")
    assert recorded(slurm) == [{"module": "pipeline.convert", "argv": list(args), "slurm_procid": "0"}]


def test_preprocess_array_tasks_each_get_their_own_shard(slurm):
    job = submit(
        slurm,
        "slurm/preprocess.sbatch",
        "--input",
        "in/part-{task:03}.jsonl",
        "--tokenizer",
        "tok",
        "--output",
        "out/web_{task}",
        "--workers",
        "2",
        options=("--array=0-1",),
    )
    assert job.returncode == 0, job.sbatch_output
    argvs = [call["argv"] for call in recorded(slurm)]
    assert argvs == [
        ["preprocess", "--input", "in/part-000.jsonl", "--tokenizer", "tok", "--output", "out/web_0", "--workers", "2"],
        ["preprocess", "--input", "in/part-001.jsonl", "--tokenizer", "tok", "--output", "out/web_1", "--workers", "2"],
    ]


def test_preprocess_workers_default_to_the_allocated_cpus(slurm):
    job = submit(
        slurm,
        "slurm/preprocess.sbatch",
        "--input",
        "a.jsonl",
        "--tokenizer",
        "tok",
        "--output",
        "o",
        options=("--cpus-per-task=3",),
    )
    assert job.returncode == 0, job_output(slurm, job, "preprocess")
    assert recorded(slurm)[0]["argv"][-2:] == ["--workers", "3"]


def test_preprocess_array_without_task_placeholder_is_refused(slurm):
    job = submit(
        slurm,
        "slurm/preprocess.sbatch",
        "--input",
        "a.jsonl",
        "--tokenizer",
        "tok",
        "--output",
        "o",
        options=("--array=0-1",),
    )
    assert job.returncode == 1
    assert "put {task} in --input and --output" in job_output(slurm, job, "preprocess")
    assert recorded(slurm) == []


def test_task_placeholder_outside_an_array_job_is_refused(slurm):
    job = submit(slurm, "slurm/preprocess.sbatch", "--input", "p-{task}.jsonl", "--tokenizer", "t", "--output", "o")
    assert job.returncode == 1
    assert "needs an array job" in job_output(slurm, job, "preprocess")


def test_distill_without_its_entry_point_says_so_and_exits_1(slurm, tmp_path):
    root = tmp_path / "checkout"
    shutil.copytree(REPO / "slurm", root / "slurm")
    job = submit(slurm, "slurm/distill.sbatch", "run_dir=runs/d", root=root)
    assert job.returncode == 1
    assert "compression stage is not available" in job_output(slurm, job, "distill")
    assert recorded(slurm) == []


def test_distill_runs_a_single_compression_step_on_every_task(slurm):
    job = submit(slurm, "slurm/distill.sbatch", "search", "compress.parent=/runs/p", "run_dir=/runs/c")
    assert job.returncode == 0, job_output(slurm, job, "distill")
    calls = recorded(slurm)
    assert calls and all(c["module"] == "pipeline.compress" for c in calls)
    assert {tuple(c["argv"]) for c in calls} == {("search", "compress.parent=/runs/p", "run_dir=/runs/c")}
    assert sorted(c["slurm_procid"] for c in calls) == sorted(str(i) for i in range(len(calls)))


def test_distill_defaults_to_all_steps_and_stops_at_done(slurm, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "DONE").write_text("10\n")
    job = submit(slurm, "slurm/distill.sbatch", "compress=minipuzzle", f"run_dir={run_dir}")
    assert job.returncode == 0, job_output(slurm, job, "distill")
    assert {tuple(c["argv"]) for c in recorded(slurm)} == {("all", "compress=minipuzzle", f"run_dir={run_dir}")}
    assert "not requeueing" in job_output(slurm, job, "distill")


def test_job_submitted_outside_the_repository_says_where_to_submit(slurm):
    job = slurm.submit("slurm/pretrain.sbatch", "model=tiny", timeout=60)
    assert job.returncode == 1
    assert "submit from the repository root or export PIPELINE_ROOT" in job_output(slurm, job, "pretrain")


def test_container_image_runs_the_step_through_pyxis(slurm):
    job = submit(slurm, "slurm/convert.sbatch", "export", "/runs/a", "/hf/a", image="img.sqsh")
    assert job.returncode == 0, job_output(slurm, job, "convert")
    (argv,) = job.srun_argvs()
    assert "--container-image=img.sqsh" in argv and f"--container-workdir={REPO}" in argv, argv
