"""Checkpoints written in the background (checkpoint.async_save): the same state as a synchronous save,
committed before the run ends, and still atomic when the trainer is killed or the disk fills up while
the writer process is writing.

One synchronous run is the reference; an async run whose writer kills the trainer at step 4 is resumed
to the end; a copy of the reference continues with a full disk under the writer. Last, the CPU smoke
test of bench/checkpoint_save.py.
"""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.distributed.training import BASE, REPO, losses, run_cpu
from tests.fault_injection import fault_env

RUN = ("train.iters=8", "checkpoint.save_interval=2")


def trainer(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.train", *BASE, f"run_dir={run_dir}", *overrides]


def session_of(leader: int) -> list[psutil.Process]:
    """Live processes of the session the trainer leads: everything it started (forked writers,
    multiprocessing's servers) unless they left the session."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if os.getsid(proc.pid) == leader and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, PermissionError):
            continue
    return found


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """8 steps saving synchronously every 2."""
    run_dir = tmp_path_factory.mktemp("sync") / "run"
    proc = run_cpu(trainer(run_dir, *RUN, "checkpoint.async_save=false"))
    assert "in the background" not in proc.stdout, proc.stdout[-2000:]
    return {"dir": run_dir, "losses": losses(run_dir)}


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """An async run whose background writer SIGKILLs the trainer while writing step 4, and which
    processes of the run (its session) were still alive 10 s later."""
    root = tmp_path_factory.mktemp("killed")
    run_dir = root / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               **fault_env("trainer-killed-while-writing@step_0000004"))
    with open(root / "out", "w") as out, open(root / "err", "w") as err:
        proc = subprocess.Popen(trainer(run_dir, *RUN), cwd=REPO, env=env, stdout=out, stderr=err,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=300)
            deadline = time.monotonic() + 10
            while session_of(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            survivors = [" ".join(p.info["cmdline"] or [])[:200] for p in session_of(proc.pid)]
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # what else the trainer started (multiprocessing's helpers)
            except ProcessLookupError:
                pass
    tmp_left = (run_dir / "checkpoints" / ".tmp-step_0000004").is_dir()
    return {"dir": run_dir, "code": code, "survivors": survivors, "tmp_left": tmp_left,
            "latest": latest(run_dir), "stderr": (root / "err").read_text()}


def test_killing_the_trainer_during_a_background_write_kills_the_writer(killed):
    assert killed["code"] == -signal.SIGKILL, f"exit {killed['code']}\n{killed['stderr'][-3000:]}"
    assert not killed["survivors"], f"processes of the killed run still alive: {killed['survivors']}"


def test_killed_background_write_leaves_the_previous_checkpoint_latest(killed):
    assert killed["latest"] == "step_0000002"
    assert killed["tmp_left"], "the interrupted save should be left as a temporary"


@pytest.fixture(scope="module")
def resumed(killed):
    """The killed run restarted to its end."""
    return run_cpu(trainer(killed["dir"], *RUN))


def test_async_run_resumes_bit_exactly_like_a_sync_one(reference, killed, resumed):
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout, resumed.stdout[-2000:]
    assert not (killed["dir"] / "checkpoints" / ".tmp-step_0000004").exists(), "stale temporary not removed"
    assert losses(killed["dir"]) == reference["losses"], "async save + kill + resume differs from the sync run"


def stored_items(step_dir: Path) -> dict[str, bytes]:
    """Stored bytes of every tensor and object of a checkpoint, by key."""
    from torch.distributed.checkpoint import FileSystemReader

    items = {}
    for index, where in FileSystemReader(str(step_dir)).read_metadata().storage_data.items():
        with open(step_dir / where.relative_path, "rb") as f:
            f.seek(where.offset)
            items[f"{index.fqn}@{index.offset}"] = f.read(where.length)
    return items


def unpickled(data: bytes):
    import torch

    return torch.load(io.BytesIO(data), weights_only=True)


def test_async_checkpoint_stores_the_same_state_as_a_sync_one(reference, killed, resumed):
    written = stored_items(killed["dir"] / "checkpoints" / "step_0000008")
    expected = stored_items(reference["dir"] / "checkpoints" / "step_0000008")
    assert written.keys() == expected.keys()
    differ = []
    for key, data in expected.items():
        if key.startswith("rng_state/"):
            continue  # differs between any two runs: nothing seeds the process RNGs saved (training uses none)
        if key.startswith("common_state/"):  # pickled objects: equal values can pickle to other bytes
            same = unpickled(written[key]) == unpickled(data)
        else:
            same = written[key] == data
        if not same:
            differ.append(key)
    assert not differ, f"{len(differ)} of {len(expected)} stored items differ, e.g. {differ[:3]}"


def test_the_save_in_flight_at_the_end_is_committed_before_done(killed, resumed):
    final = killed["dir"] / "checkpoints" / "step_0000008"
    assert f"saved checkpoint {final}: stall" in resumed.stdout and "in the background" in resumed.stdout, \
        resumed.stdout[-2000:]
    assert latest(killed["dir"]) == "step_0000008" and (killed["dir"] / "DONE").exists()
    rows = [json.loads(line) for line in (killed["dir"] / "metrics.jsonl").read_text().splitlines()]
    saved = [r for r in rows if r["kind"] == "checkpoint"]
    assert saved and saved[-1]["saved_step"] == 8 and saved[-1]["stall_s"] >= 0, saved


def test_full_disk_under_the_background_writer_is_one_line_and_keeps_the_previous_checkpoint(reference, tmp_path):
    run_dir = shutil.copytree(reference["dir"], tmp_path / "run")
    proc = run_cpu(trainer(run_dir, "train.iters=10", "checkpoint.save_interval=2"),
                   env=fault_env("disk-full-while-writing@step_0000010"), check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "disk full" in errors[0] and "step_0000010" in errors[0] and str(run_dir / "checkpoints") in errors[0], \
        errors[0]
    assert latest(run_dir) == "step_0000008"
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "the half-written save was left behind"
    assert not (run_dir / "DONE").exists(), "a run whose last save failed must not look finished"


def test_checkpoint_save_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "out"
    proc = run_cpu([sys.executable, "bench/checkpoint_save.py", "--model", "tiny", "--out", str(out), "--saves", "2"])
    result = json.loads((out / "checkpoint_save.json").read_text())
    assert result["gb"] > 0 and result["copy_gb"] == result["gb"], result
    assert abs(result["async_gb"] / result["gb"] - 1) < 1e-4, result  # RNG states serialise to varying lengths
    assert len(result["async_stall_s"]) == len(result["async_write_s"]) == 2, result
    assert min(result["sync_save_s"], *result["async_stall_s"], *result["async_write_s"], result["copy_s"]) > 0, result
    assert "background save 2: stall of the loop" in proc.stdout, proc.stdout[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint_save.json"], "checkpoints left without --keep"
