"""Where training metrics go: the console, run_dir/metrics.jsonl, TensorBoard and Weights & Biases.

Only global rank 0 writes. TensorBoard and W&B are imported lazily, only when switched on. W&B runs
offline without an API key (or network), and a restarted run continues the same W&B run (its id is
kept in the run dir). TensorBoard event files go to run_dir/tensorboard; a restarted run drops the
events it is about to log again (steps after the checkpoint it resumed from).
"""

import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline.fs import atomic_write_text


@dataclass
class LoggingConfig:
    """Where metrics go: console always, JSONL in the run directory, TensorBoard and W&B when enabled."""

    interval: int = 10
    """Log every N steps."""
    tensorboard: bool = False
    """Write TensorBoard event files to run_dir/tensorboard (`tensorboard --logdir runs/`)."""
    wandb: bool = False
    wandb_project: str = "nemotron-h"
    wandb_entity: Optional[str] = None

WANDB_ID_FILE = "wandb_id.txt"
TENSORBOARD_DIR = "tensorboard"


def _fmt(key: str, value) -> str:
    if isinstance(value, float):
        if key in ("lr",):
            return f"{key} {value:.3e}"
        if math.isfinite(value) and abs(value) >= 1000:
            return f"{key} {value:,.0f}"
        return f"{key} {value:.4g}"
    return f"{key} {value}"


class MetricsLogger:
    """log(step, {...}) fans one record out to every enabled sink; close() flushes them."""

    def __init__(self, cfg: LoggingConfig, run_dir: str, rank: int, run_name: str, config: dict | None = None):
        self.enabled = rank == 0
        self._jsonl = None
        self._wandb = None
        self._tensorboard = None
        self._tensorboard_dir = Path(run_dir) / TENSORBOARD_DIR if cfg.tensorboard else None
        if not self.enabled:
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self._jsonl = open(Path(run_dir) / "metrics.jsonl", "a")
        if cfg.wandb:
            self._wandb = _start_wandb(cfg, run_dir, run_name, config)

    def log(self, step: int, record: dict, kind: str = "train") -> None:
        """Write one record (numbers and strings) for `step`."""
        if not self.enabled:
            return
        row = {"step": step, "kind": kind, "time": time.time(), **record}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        shown = "  ".join(_fmt(k, v) for k, v in record.items())
        print(f"[{kind} {step}] {shown}", file=sys.stdout, flush=True)
        numbers = {f"{kind}/{k}": v for k, v in record.items() if isinstance(v, (int, float))}
        if self._tensorboard_dir is not None:
            self._log_tensorboard(step, numbers)
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{k}": v for k, v in record.items()}, step=step)

    def _log_tensorboard(self, step: int, numbers: dict) -> None:
        if self._tensorboard is None:
            # Created at the first record so that purge_step is the first step this invocation logs:
            # after a resume, events a crashed predecessor wrote past its last checkpoint are dropped.
            self._tensorboard = _start_tensorboard(self._tensorboard_dir, purge_step=step)
        for tag, value in numbers.items():
            self._tensorboard.add_scalar(tag, value, global_step=step)
        self._tensorboard.flush()

    def info(self, message: str) -> None:
        """A plain message on rank 0's console."""
        if self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_tensorboard(log_dir: Path, purge_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("logging.tensorboard=true needs the tensorboard package: pip install tensorboard") from e
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def _start_wandb(cfg: LoggingConfig, run_dir: str, run_name: str, config: dict | None):
    try:
        import wandb
    except ImportError as e:
        raise ImportError("logging.wandb=true needs the wandb package: pip install wandb") from e
    if not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") is None:
        os.environ["WANDB_MODE"] = "offline"
    id_file = Path(run_dir) / WANDB_ID_FILE
    # Our own id: wandb.util.generate_id is gone in wandb 0.31 (it crashed every fresh run). W&B run ids
    # W&B ids are 8 lowercase alphanumerics, as ours are.
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    if not id_file.exists():
        atomic_write_text(id_file, run_id)
    return wandb.init(
        project=cfg.wandb_project, entity=cfg.wandb_entity, name=run_name, id=run_id,
        resume="allow", dir=run_dir, config=config,
    )
