"""SIGTERM to the torchrun launcher (what a scheduler or a user's Ctrl-C sends it): torchrun passes it to
each worker's whole process group, checkpoint helpers included. The workers save the step they are in
and stop without DONE; the same command started again resumes there and logs exactly the losses of an
uninterrupted run. Training and distillation, 2 processes, with a background save and without (one
run directory stopped twice: once with each).

(torchrun itself then exits 1, its own SignalException: the job script reads run_dir/DONE.)"""

import re
import signal

import pytest

from pipeline.checkpoint import verify_checkpoint
from tests.distributed.compress_runs import TINY, make_parent, make_student
from tests.distributed.training import BASE, Trainer, losses

ITERS = 16
TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    """Entry point -> (command, reference run_dir): the reference ran ITERS steps uninterrupted."""
    root = tmp_path_factory.mktemp("launcher_signal")
    parent = make_parent(root / "parent")
    student = make_student(parent, root / "student", hidden=range(0, 128, 2))
    out = {
        "train": (*TORCHRUN, "-m", "pipeline.train", *BASE, f"train.iters={ITERS}"),
        "distill": (*TORCHRUN, "-m", "pipeline.compress", "distill", *TINY, f"train.iters={ITERS}",
                    f"compress.parent={parent}", f"compress.student={student}"),
    }
    references = {name: Trainer(root / f"{name}_straight", root / f"{name}_straight", command=command)
                  for name, command in out.items()}
    for name, reference in references.items():
        done = reference.wait(timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    return {name: (command, root / f"{name}_straight") for name, command in out.items()}, root


@pytest.mark.parametrize("entry", ["train", "distill"])
def test_sigterm_to_torchrun_saves_and_resumes_exactly(commands, entry):
    """Stopped twice in one run directory, first with a background save, then (in the restart) with a
    synchronous one; the start after that ends with the uninterrupted run's losses."""
    (command, reference), root = commands[0][entry], commands[1]
    run_dir = root / entry
    step = 0
    for async_save in ("true", "false"):
        setting = f"checkpoint.async_save={async_save}"
        first = Trainer(run_dir, root / f"{entry}_{async_save}", setting, command=command)
        first.wait_for_step(step + 2)
        first.proc.send_signal(signal.SIGTERM)  # the launcher only
        stopped = first.wait(timeout=120)
        found = re.search(r"stopping at step (\d+) \(SIGTERM\)", stopped.stdout)
        assert found, f"{setting}: exit {stopped.returncode}\n{stopped.stdout[-2000:]}\n{stopped.stderr[-4000:]}"
        assert "ConnectionRefusedError" not in stopped.stderr, stopped.stderr[-4000:]
        assert step == 0 or f"from step {step}" in stopped.stdout, stopped.stdout[-2000:]
        previous, step = step, int(found.group(1))
        assert previous + 2 <= step < ITERS and not (run_dir / "DONE").exists(), (setting, step)
        latest = (run_dir / "checkpoints" / "latest").read_text().strip()
        assert verify_checkpoint(run_dir / "checkpoints" / latest).step == step, setting
    restarted = Trainer(run_dir, root / f"{entry}_last", command=command).wait(timeout=600)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert f"from step {step}" in restarted.stdout and (run_dir / "DONE").exists()
    assert losses(run_dir) == losses(reference), f"two stops + restarts differ from {ITERS} straight steps"
