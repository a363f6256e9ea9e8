"""Helpers for tests that run `python -m pipeline.train` under torchrun on CPU processes (gloo)."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Small and fast, fp32 so layouts can be compared tightly; 8 sequences of 128 tokens per step.
BASE = [
    "precision=fp32",
    "train.seq_length=128",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.eval_interval=0",
    "logging.interval=1",
    "checkpoint.save_interval=0",
]


def train(run_dir: Path, nproc: int, *overrides: str, env: dict | None = None, check: bool = True,
          timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the training entry point on `nproc` CPU processes with BASE + overrides: under torchrun, or
    for one process `python -m pipeline.train` itself (the README's one-process command; torchrun's
    launcher would add about 2 s of start-up to each such run)."""
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, "-m", "pipeline.train", *BASE, f"run_dir={run_dir}", *overrides]
    return run_cpu(cmd, env=env, check=check, timeout=timeout)


def _own_world() -> dict:
    """This environment without the world variables of one that a test process may have set up in-process
    (pipeline.distributed): a child started without torchrun would join it."""
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}


def run_cpu(cmd: list[str], env: dict | None = None, check: bool = True,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `cmd` in the repository on CPU (one thread per process); with `check`, fail with its output."""
    full_env = dict(_own_world(), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    full_env.update(env or {})
    # Output to files and a process group of its own: a rank killed on purpose leaves megatron's
    # checkpoint-writer processes orphaned; they would hold pipes open and linger after the test.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=out, stderr=err, start_new_session=True)
        try:
            returncode = child.wait(timeout=timeout)
        finally:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out.seek(0)
        err.seek(0)
        proc = subprocess.CompletedProcess(cmd, returncode, out.read(), err.read())
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}\n"
            f"--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


def losses(run_dir: Path, kind: str = "train") -> dict[int, float]:
    """Step -> loss from the run's metrics.jsonl (later records win, e.g. after a resume)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == kind:
            out[row["step"]] = row["loss"]
    return out


def max_rel_diff(a: dict[int, float], b: dict[int, float]) -> float:
    assert a.keys() == b.keys(), f"different steps logged: {sorted(a)} vs {sorted(b)}"
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in a)


class Trainer:
    """`python -m pipeline.train` as one plain process (no torchrun: signals and the exit status are its
    own) with BASE + overrides; its output goes to files `logs`.out/.err (pipes could fill and block it).
    `command` replaces what follows the interpreter before run_dir and the overrides (another entry
    point, e.g. `-m pipeline.compress distill` with its own base overrides)."""

    def __init__(self, run_dir: Path, logs: Path, *overrides: str, env: dict | None = None,
                 command: tuple[str, ...] = ("-m", "pipeline.train", *BASE)):
        cmd = [sys.executable, *command, f"run_dir={run_dir}", *overrides]
        full_env = dict(_own_world(), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        full_env.update(env or {})
        self.run_dir, self._out, self._err = Path(run_dir), logs.with_suffix(".out"), logs.with_suffix(".err")
        with open(self._out, "w") as out, open(self._err, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=out, stderr=err)

    def wait(self, timeout: float = 300) -> subprocess.CompletedProcess:
        """Wait for the exit; the status and the output."""
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return subprocess.CompletedProcess(self.proc.args, code, self._out.read_text(), self._err.read_text())

    def wait_for_step(self, step: int, timeout: float = 300) -> None:
        """Block until metrics.jsonl has a training record of `step` (fail if the trainer ends first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                done = self.wait()
                raise AssertionError(f"trainer exited {done.returncode} before step {step}\n"
                                     f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            try:
                if (self.run_dir / "metrics.jsonl").exists() and max(losses(self.run_dir), default=0) >= step:
                    return
            except json.JSONDecodeError:
                pass  # a line being written
            time.sleep(0.2)
        raise AssertionError(f"no step {step} in {self.run_dir}/metrics.jsonl after {timeout} s")
