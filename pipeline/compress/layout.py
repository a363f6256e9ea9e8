"""The only module that knows where compression keeps its files (as `pipeline.checkpoint` knows checkpoints).

    run_dir/compress/
      scores/            importance scores of the parent (`importance`; compress.scores_file moves them)
      candidates.json    the top candidates of `search`
      candidates/c0/     candidate c0 pruned from the parent (`rank`): a run dir of its own, with
                         checkpoints/, model/<name>.yaml and keep_plan.json (what it kept of the parent)
      rank/c0/           candidate c0's short distillation (`rank`): a run dir
      rank.json          the ranking table (`rank`)
      best.json          rank's pick: the student `distill` trains when compress.student is not set
      progress.json      which steps are complete, and for which request (`progress.py`)

Each step reads what the earlier ones wrote here, so the steps can run one at a time.
"""

from dataclasses import dataclass
from pathlib import Path

PLAN_FILE = "keep_plan.json"
"""Written beside a pruned student's checkpoints/ (`prune.prune_checkpoint`): the parent's units it kept."""


@dataclass(frozen=True)
class CompressLayout:
    """The compression files of one run directory."""

    root: Path
    """<run_dir>/compress."""
    scores: Path
    """The importance scores: compress.scores_file, else <root>/scores."""

    @classmethod
    def of(cls, run) -> "CompressLayout":
        """The layout of `run` (a RunConfig: its run_dir and compress.scores_file)."""
        root = Path(run.run_dir) / "compress"
        return cls(root=root, scores=Path(run.compress.scores_file or root / "scores"))

    @property
    def candidates(self) -> Path:
        return self.root / "candidates.json"

    def candidate_dir(self, name: str) -> Path:
        """Where candidate `name` is pruned to (a run dir)."""
        return self.candidates_root / name

    def rank_run_dir(self, name: str) -> Path:
        """Where candidate `name`'s short distillation runs."""
        return self.rank_root / name

    @property
    def rank_table(self) -> Path:
        return self.root / "rank.json"

    @property
    def best(self) -> Path:
        return self.root / "best.json"

    @property
    def progress(self) -> Path:
        return self.root / "progress.json"

    @property
    def rank_root(self) -> Path:
        """Every candidate's pruned student and short distillation (`rank`), started over together."""
        return self.root / "rank"

    @property
    def candidates_root(self) -> Path:
        return self.root / "candidates"


def plan_file(student_dir: Path) -> Path:
    """The keep plan of a pruned student, from one of its step directories (<root>/checkpoints/step_N)."""
    return Path(student_dir).parent.parent / PLAN_FILE
