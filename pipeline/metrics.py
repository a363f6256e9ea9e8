"""Where training metrics go: the console, run_dir/metrics.jsonl, TensorBoard and Weights & Biases.

Only global rank 0 writes. TensorBoard and W&B are imported lazily, only when switched on. W&B runs
offline without an API key (or network), and a restarted run continues the same W&B run (its id is
kept in the run dir). TensorBoard event files go to run_dir/tensorboard; a restarted run drops the
events it is about to log again (steps after the checkpoint it resumed from).

metrics.jsonl gets whole lines only: each record is appended with one write and, if the disk
refuses part of it, cut back to the last whole line before the StorageError; a partial last line
left by a process killed mid-write is removed (with a warning) when the next run opens the file.
"""

import json
import math
import os
import stat
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline.fs import atomic_write_text, storage_error


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

METRICS_FILE = "metrics.jsonl"
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


class JsonlFile:
    """An append-only JSON-lines file that holds whole lines only (module docstring)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._drop_partial_line()
        except OSError as e:
            raise storage_error(e, "the metrics log", path) from None

    def _drop_partial_line(self) -> None:
        size = os.fstat(self._fd).st_size
        if not stat.S_ISREG(os.fstat(self._fd).st_mode) or size == 0:
            return
        keep = 0
        with open(self.path, "rb") as f:
            end = size
            while end > 0:  # back from the end to the last newline, 64 KiB at a time
                start = max(0, end - (1 << 16))
                f.seek(start)
                newline = f.read(end - start).rfind(b"\n")
                if newline >= 0 or start == 0:
                    keep = start + newline + 1
                    break
                end = start
        if keep < size:
            os.ftruncate(self._fd, keep)
            print(f"WARNING: {self.path} ended in a partial line ({size - keep} bytes, from an interrupted "
                  f"write); removed it", file=sys.stderr, flush=True)

    def append(self, line: str) -> None:
        """Append `line` and a newline, whole; StorageError (and the file as it was) if the disk refuses it."""
        data = (line + "\n").encode()
        before = os.fstat(self._fd).st_size
        try:
            written = 0
            while written < len(data):  # a short write (disk nearly full) is continued or refused
                written += os.write(self._fd, data[written:])
        except OSError as e:
            try:
                os.ftruncate(self._fd, before)
            except OSError:
                pass  # not a regular file (a device): nothing was kept
            raise storage_error(e, "the metrics log", self.path) from None

    def close(self) -> None:
        os.close(self._fd)


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
        self._jsonl = JsonlFile(Path(run_dir) / METRICS_FILE)
        if cfg.wandb:
            self._wandb = _start_wandb(cfg, run_dir, run_name, config)

    def log(self, step: int, record: dict, kind: str = "train") -> None:
        """Write one record (numbers and strings) for `step`."""
        if not self.enabled:
            return
        row = {"step": step, "kind": kind, "time": time.time(), **record}
        self._jsonl.append(json.dumps(row))
        shown = "  ".join(_fmt(k, v) for k, v in record.items())
        print(f"[{kind} {step}] {shown}", file=sys.stdout, flush=True)
        numbers = {f"{kind}/{k}": v for k, v in record.items() if isinstance(v, (int, float))}
        if self._tensorboard_dir is not None:
            # Names (the training phase) as text events: TensorBoard scalars are numbers only.
            texts = {f"{kind}/{k}": v for k, v in record.items() if isinstance(v, str)}
            self._log_tensorboard(step, numbers, texts)
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{k}": v for k, v in record.items()}, step=step)

    def _log_tensorboard(self, step: int, numbers: dict, texts: dict) -> None:
        if self._tensorboard is None:
            # Created at the first record so that purge_step is the first step this invocation logs:
            # after a resume, events a crashed predecessor wrote past its last checkpoint are dropped.
            self._tensorboard = _start_tensorboard(self._tensorboard_dir, purge_step=step)
        for tag, value in numbers.items():
            self._tensorboard.add_scalar(tag, value, global_step=step)
        for tag, value in texts.items():
            self._tensorboard.add_text(tag, value, global_step=step)
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
