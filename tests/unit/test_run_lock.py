"""The run-directory lock dies with the process that took it, also when that process leaves forked
children behind (megatron-core's checkpoint writers are forked). The refusal of a second trainer, in
real trainer processes: tests/distributed/test_run_faults.py."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import RunDirLockedError
from pipeline.training.run_lock import run_dir_owner

REPO = Path(__file__).resolve().parents[2]
HOLDER = """
import os, sys, time
from pipeline.training.run_lock import run_dir_owner
with run_dir_owner(sys.argv[1], rank=0):
    if os.fork() == 0:             # a child that outlives its parent, as a lingering writer would
        time.sleep(60)
        os._exit(0)
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def start_holder(run_dir: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), str(seconds)], cwd=REPO, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_live_holder_is_named_in_the_refusal(tmp_path):
    holder = start_holder(tmp_path, 60)
    try:
        with pytest.raises(RunDirLockedError, match=f"pid {holder.pid} "):
            with run_dir_owner(tmp_path, rank=0):
                pass
    finally:
        os.killpg(holder.pid, signal.SIGKILL)


@pytest.mark.parametrize("ending", ["exit", "kill -9"])
def test_the_lock_dies_with_its_process_not_with_its_children(tmp_path, ending):
    holder = start_holder(tmp_path, 0 if ending == "exit" else 60)
    try:
        if ending == "kill -9":
            holder.kill()
        holder.wait(timeout=30)
        time.sleep(0.1)
        with run_dir_owner(tmp_path, rank=0):
            assert f"pid {os.getpid()} " in (tmp_path / ".lock").read_text()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
