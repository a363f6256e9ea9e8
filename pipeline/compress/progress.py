"""Which compression steps of a run_dir are complete, so that a stopped command resumes where it stopped.

    progress = Progress.of(run, parent.identity)       # every rank
    progress.state("importance")                       # "complete", "started" or None (agreed by all ranks)
    progress.mark("importance", COMPLETE)              # rank 0 writes; all ranks call

<run_dir>/compress/progress.json records per step the request it ran for (a digest of the run config
and the parent checkpoint) and whether it is started or complete. A step complete for the same
request, its results still in place, is not run again; `rank` started for the same request resumes:
the candidates it finished count, the one it was distilling resumes from its checkpoint. Any other
request starts the step over. The distillation resumes on its own (its checkpoints).

What the digest leaves out cannot change a step before the distillation: run_dir, the steps asked
for, the distillation's length (train.iters, train.exit_after_steps; `rank` sets its own), logging
and checkpoint settings.
"""

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from pipeline.compress.layout import CompressLayout
from pipeline.compress.scores import ParentIdentity
from pipeline.fs import atomic_write_text

STARTED, COMPLETE = "started", "complete"
IGNORED = (("run_dir",), ("compress", "steps"), ("train", "iters"), ("train", "exit_after_steps"),
           ("logging",), ("checkpoint",))


def request_digest(run, parent: ParentIdentity) -> str:
    """What a step's results depend on: the run config (less IGNORED) and the parent checkpoint."""
    config = dataclasses.asdict(run)
    for *outer, key in IGNORED:
        node = config
        for name in outer:
            node = node[name]
        node.pop(key)
    parent_record = {**dataclasses.asdict(parent), "checkpoint": str(Path(parent.checkpoint).resolve())}
    text = json.dumps({"config": config, "parent": parent_record}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _outputs(files: CompressLayout) -> dict[str, tuple[Path, ...]]:
    """What each step leaves behind when complete."""
    return {"importance": (files.scores,), "search": (files.candidates,), "rank": (files.rank_table, files.best)}


@dataclass
class Progress:
    """The progress record of one run_dir's compression, for one request."""

    files: CompressLayout
    request: str

    @classmethod
    def of(cls, run, parent: ParentIdentity) -> "Progress":
        return cls(CompressLayout.of(run), request_digest(run, parent))

    def _records(self) -> dict:
        try:
            return json.loads(self.files.progress.read_text())
        except (OSError, ValueError):  # none yet; a damaged one (written atomically: not by us) counts as none
            return {}

    def state(self, step: str) -> str | None:
        """STARTED, COMPLETE (its results in place) or None, for this request; rank 0's view on every rank."""
        box = [None]
        if dist.get_rank() == 0:
            record = self._records().get(step, {})
            state = record.get("state") if record.get("request") == self.request else None
            if state == COMPLETE and not all(p.exists() for p in _outputs(self.files).get(step, ())):
                state = None
            box = [state]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mark(self, step: str, state: str) -> None:
        """Record `step` as `state` for this request (all ranks call; rank 0 writes, atomically)."""
        dist.barrier()  # every rank has read what it needs of the record before it changes
        if dist.get_rank() == 0:
            records = self._records()
            records[step] = {"state": state, "request": self.request}
            self.files.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.files.progress, json.dumps(records, indent=2))
        dist.barrier()
