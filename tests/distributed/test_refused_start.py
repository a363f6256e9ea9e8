"""A refused start changes nothing: a finished run that a command refuses to resume or to compress into
stays exactly as it was (DONE kept, so a job script does not requeue it; config.yaml, metrics and
checkpoints untouched), and a sweep with one impossible point runs no job. Each command as a user types
it, one process on CPU: exit status 2 with one `error:` line."""

import sys

import pytest

from tests.distributed.compress_runs import make_parent
from tests.distributed.training import BASE, run_cpu


def snapshot(root) -> dict:
    """Every file and directory under `root`: its size and modification time (not the lock file's: it
    names its last holder, pipeline/training/run_lock.py)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.name != ".lock"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = make_parent(tmp_path_factory.mktemp("refused") / "done")
    assert (run_dir / "DONE").exists() and (run_dir / "config.yaml").exists()
    return run_dir


def _refused(*argv: str) -> str:
    proc = run_cpu([sys.executable, *argv], check=False, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert lines[-1].startswith("error: ") and sum(line.startswith("error") for line in lines) == 1, lines[-5:]
    return lines[-1]


TRAIN = ("-m", "pipeline.train", *BASE, "train.iters=2")


@pytest.mark.parametrize("case, argv, message", [
    ("another model shape", (*TRAIN, "model.hidden_size=64"), "model.hidden_size=64"),
    ("FP8 on CPU", (*TRAIN, "precision=fp8_delayed"), "needs a GPU"),
    ("compress into the parent's run dir", ("-m", "pipeline.compress", "distill", "train.iters=2",
                                            "compress.student={run_dir}"), "overlaps the parent"),
    ("compress inside the parent's run dir", ("-m", "pipeline.compress", "importance", "run_dir={run_dir}/kd"),
     "overlaps the parent"),
])
def test_a_refused_start_leaves_the_run_dir_as_it_was(finished, case, argv, message):
    before = snapshot(finished)
    argv = [a.format(run_dir=finished) for a in argv]
    if argv[1] == "pipeline.compress":
        argv += [f"compress.parent={finished}", "device=cpu"]
    if not any(a.startswith("run_dir=") for a in argv):
        argv.append(f"run_dir={finished}")
    assert message in _refused(*argv), case
    assert snapshot(finished) == before, f"{case}: refused, but the run dir changed"


def test_a_sweep_with_an_impossible_point_runs_no_job(tmp_path):
    run_dir = tmp_path / "sweep"
    line = _refused("-m", "pipeline.train", "-m", *TRAIN[2:], "precision=fp32,fp8_delayed", f"run_dir={run_dir}")
    assert "precision=fp8_delayed" in line
    assert not run_dir.exists(), "a job of the sweep ran before the impossible point was refused"


@pytest.mark.parametrize("step", ["importance", "search", "rank", "all"])
def test_every_compression_step_is_refused_on_a_run_dir_in_use(finished, tmp_path, step):
    from pipeline.training.run_lock import run_dir_owner

    run_dir = tmp_path / "kd"
    with run_dir_owner(run_dir, 0):  # another command's, as far as the subprocess can tell
        line = _refused("-m", "pipeline.compress", step, f"compress.parent={finished}", "device=cpu",
                        "compress.target_params=0.9e6", f"run_dir={run_dir}")
    assert "is in use by another run" in line, line
    assert [p.name for p in run_dir.iterdir()] == [".lock"], "a refused step wrote into the run dir"
