"""Helpers for the compression tests: run an entry point as a user would (CPU processes, gloo) and
read a run's validation records."""

import json
import subprocess
import sys
from pathlib import Path

from tests.distributed.training import run_cpu


def torchrun(nproc: int, module: str, *overrides: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N -m MODULE OVERRIDES...`."""
    return run_cpu([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={nproc}", "-m", module, *overrides])


def records(run_dir: Path, kind: str) -> list[dict]:
    """The run's metrics.jsonl records of one kind ("train" or "valid"), in order."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


# Small and fast, fp32 so that runs compare bit for bit; 4 sequences of 64 tokens per step.
TINY = ["precision=fp32", "train.seq_length=64", "train.global_batch_size=4", "train.micro_batch_size=2",
        "train.eval_interval=0", "logging.interval=1", "checkpoint.save_interval=0", "device=cpu"]


def make_parent(run_dir: Path, *overrides: str) -> Path:
    """A tiny parent checkpoint (one training step, in this process); returns run_dir."""
    from pipeline.config import load_run_config
    from pipeline.training.loop import train

    assert train(load_run_config([*TINY, "train.iters=1", f"run_dir={run_dir}", *overrides])).done
    return run_dir


def make_student(parent_dir: Path, out_dir: Path, **keep) -> Path:
    """The parent pruned by explicit unit indices (pipeline/compress/prune.py's make_plan); returns
    the student's step directory."""
    from pipeline.compress.parent import open_parent
    from pipeline.compress.prune import make_plan, prune_checkpoint

    _, _, model, tensors = open_parent(parent_dir)
    tensors.close()
    return prune_checkpoint(parent_dir, make_plan(model, **keep), out_dir)
