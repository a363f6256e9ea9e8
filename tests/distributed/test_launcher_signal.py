"""SIGTERM to the torchrun launcher (what a scheduler or a user's Ctrl-C sends it): torchrun passes it to
each worker's whole process group, checkpoint helpers included. The workers save the step they are in
and stop without DONE; the same command started again resumes there and logs exactly the losses of an
uninterrupted run. Training and distillation, 2 processes, with a background save and without.

(torchrun itself then exits 1, its own SignalException: the job script reads run_dir/DONE.)"""

import re
import signal

import pytest

from pipeline.checkpoint import verify_checkpoint
from tests.distributed.compress_runs import TINY, make_parent, make_student
from tests.distributed.training import BASE, Trainer, losses

ITERS = 12
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


@pytest.mark.parametrize("async_save", ["true", "false"])
@pytest.mark.parametrize("entry", ["train", "distill"])
def test_sigterm_to_torchrun_saves_and_resumes_exactly(commands, entry, async_save):
    (command, reference), root = commands[0][entry], commands[1]
    run_dir = root / f"{entry}_{async_save}"
    setting = f"checkpoint.async_save={async_save}"
    first = Trainer(run_dir, root / f"{entry}_{async_save}_first", setting, command=command)
    first.wait_for_step(2)
    first.proc.send_signal(signal.SIGTERM)  # the launcher only
    stopped = first.wait(timeout=120)
    found = re.search(r"stopping at step (\d+) \(SIGTERM\)", stopped.stdout)
    assert found, f"exit {stopped.returncode}\n{stopped.stdout[-2000:]}\n{stopped.stderr[-4000:]}"
    assert "ConnectionRefusedError" not in stopped.stderr, stopped.stderr[-4000:]
    step = int(found.group(1))
    assert 2 <= step < ITERS and not (run_dir / "DONE").exists()
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert verify_checkpoint(run_dir / "checkpoints" / latest).step == step

    restarted = Trainer(run_dir, root / f"{entry}_{async_save}_second", setting, command=command).wait(timeout=600)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert f"from step {step}" in restarted.stdout and (run_dir / "DONE").exists()
    assert losses(run_dir) == losses(reference), f"stopped at {step} + restart differs from {ITERS} straight steps"

