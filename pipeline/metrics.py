"""Where training metrics go: the console, run_dir/metrics.jsonl and Weights & Biases.

Only global rank 0 writes. W&B is imported lazily; without an API key (or network) it runs in
offline mode, and a restarted run continues the same W&B run (its id is kept in the run dir).
"""

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass
class LoggingConfig:
    """Where metrics go: console always, JSONL in the run directory, W&B when enabled."""

    interval: int = 10
    """Log every N steps."""
    wandb: bool = False
    wandb_project: str = "nemotron-h"
    wandb_entity: Optional[str] = None


WANDB_ID_FILE = "wandb_id.txt"


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
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{k}": v for k, v in record.items()}, step=step)

    def info(self, message: str) -> None:
        """A plain message on rank 0's console."""
        if self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(cfg: LoggingConfig, run_dir: str, run_name: str, config: dict | None):
    try:
        import wandb
    except ImportError as e:
        raise ImportError("logging.wandb=true needs the wandb package: pip install wandb") from e
    if not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") is None:
        os.environ["WANDB_MODE"] = "offline"
    id_file = Path(run_dir) / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
    id_file.write_text(run_id)
    return wandb.init(
        project=cfg.wandb_project, entity=cfg.wandb_entity, name=run_name, id=run_id,
        resume="allow", dir=run_dir, config=config,
    )
