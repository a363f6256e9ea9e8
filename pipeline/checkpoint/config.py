"""The `checkpoint` config group: when to save, what to keep, where to start from."""

from dataclasses import dataclass
from typing import Optional


@dataclass
class CheckpointConfig:
    """When to save and what to keep; restarting with the same run_dir resumes from the latest."""

    save_interval: int = 100
    """Save every N steps (also at the end and on SIGTERM/SIGUSR1); 0 = only those."""
    save_at_end: bool = True
    """Save when train.iters is reached (benchmarks turn it off; stop signals still save)."""
    keep_last: int = 3
    """Keep the newest K checkpoints (0 keeps all)."""
    resume: bool = True
    """Resume from run_dir/checkpoints/latest when it exists."""
    init_from: Optional[str] = None
    """Start a new run from these weights (a checkpoint, e.g. an imported HF model): weights only."""
    async_save: bool = True
    """Write checkpoints in the background: training stops only to copy the state to host memory
    (and for the commit) while a forked process writes the files. On by default: the saved state
    and the atomic commit are the same as a synchronous save's, so it changes no numbers, and it
    works on CPU as on GPU; it costs host memory for one copy of each rank's state while a save is
    in flight. false: training waits until the files are written."""
