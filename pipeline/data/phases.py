"""Training phases (`data.phases`; schema and checks in pipeline/data/config.py, against the rest of the
run in pipeline/config.py): a run as a list of stages, each with its own data blend (and sequence
length), switching at given steps inside one run_dir.

    data:
      phases:
        - {name: broad, start_step: 0, paths: [web, code], weights: [0.7, 0.3]}
        - {name: quality, start_step: 400, paths: [web_hq, code], weights: [0.5, 0.5]}
        - {name: long, start_step: 540, paths: [books], weights: [1.0], seq_length: 1024, lr_decay: true}

Phase i runs steps [start_step_i, start_step_{i+1}) (the last one to train.iters) on its own megatron
dataset, seeded with train.seed + i: step s of the run reads samples (s - start_step_i) * G + [0, G)
of it (G = global batch), so the data order inside a phase depends only on that phase's settings and a
resume lands on the right sample. An empty `data.phases` is one implicit phase over data.paths /
data.weights at train.seq_length (the run as without phases).

A resumed run refuses a changed started phase (start_step < the checkpoint's step: its start, blend or
sequence length) and accepts any change to the phases not yet started. Moving the end of the running
phase (the next start_step, or train.iters for the last) is accepted but, as changing train.iters in a
run without phases, may reorder its remaining samples (megatron sizes a dataset's shuffle by its length).
"""

from dataclasses import dataclass
from typing import Optional

from pipeline.data.config import PhaseConfig


@dataclass(frozen=True)
class Phase:
    """A phase resolved against the run: what the trainer and the checkpoint record use."""

    index: int
    name: str
    start: int
    end: int
    """One past its last step."""
    paths: tuple[str, ...]
    weights: tuple[float, ...]
    seq_length: int
    lr_decay: bool = False

    def record(self) -> dict:
        """What a checkpoint keeps of the phase, to refuse a resume that changes it once started."""
        return {"name": self.name, "start_step": self.start, "paths": list(self.paths),
                "weights": list(self.weights), "seq_length": self.seq_length}


def resolve_phases(phases: list[PhaseConfig], paths: list[str], weights: list[float], seq_length: int,
                   iters: int) -> list[Phase]:
    """The run's phases with defaults filled in (one implicit, unnamed phase without `data.phases`)."""
    if not phases:
        return [Phase(0, "", 0, iters, tuple(paths), tuple(weights), seq_length)]
    resolved = []
    for i, phase in enumerate(phases):
        own_paths = phase.paths or paths
        own_weights = phase.weights or (weights if not phase.paths else [1.0] * len(phase.paths))
        end = phases[i + 1].start_step if i + 1 < len(phases) else iters
        resolved.append(Phase(i, phase.name, phase.start_step, end, tuple(own_paths),
                              tuple(float(w) for w in own_weights), phase.seq_length or seq_length,
                              phase.lr_decay))
    return resolved


def phase_at(phases: list[Phase], step: int) -> Phase:
    """The phase that runs optimizer step `step` (counted from 0)."""
    for phase in reversed(phases):
        if step >= phase.start:
            return phase
    return phases[0]


def wsd_decay_iters(phases: list[Phase], iters: int) -> int:
    """WSD's decay length set by a phase with lr_decay (0: none does)."""
    return next((iters - phase.start for phase in phases if phase.lr_decay), 0)


COMPARED = ("start_step", "paths", "weights", "seq_length")
"""What must stay the same in a started phase: what decides its samples."""


def check_started_phases_unchanged(saved: list[dict], phases: list[Phase], step: int) -> Optional[str]:
    """Why a resume at checkpoint `step` cannot go on with `phases` (None when it can): the phases that
    had started (start_step < step) by the checkpoint must be the same in both (COMPARED: a name may
    change, so a run without phases can go on as the first of several); the others may change."""
    before = [record for record in saved if record["start_step"] < step]
    now = [phase.record() for phase in phases]
    problem = None
    for i, old in enumerate(before):
        if i >= len(now):
            problem = f"data.phases[{i}] ({old['name'] or 'data.paths'}) was removed, but had started at step " \
                      f"{old['start_step']}"
        elif any(now[i][key] != old[key] for key in COMPARED):
            change = "; ".join(f"{key} {old[key]} -> {now[i][key]}" for key in COMPARED if old[key] != now[i][key])
            problem = f"data.phases[{i}] ({now[i]['name'] or old['name'] or 'data.paths'}) {change}"
        if problem:
            break
    if problem is None and len(now) > len(before) and now[len(before)]["start_step"] < step:
        new = now[len(before)]
        problem = (f"data.phases[{len(before)}] ({new['name']}) starts at step {new['start_step']}, before the "
                   f"checkpoint")
    if problem:
        return (f"{problem}: a phase the checkpoint at step {step} has started must stay as it was; restore it "
                f"(change only phases starting after step {step}) or train the change in a new run_dir with "
                f"checkpoint.init_from")
    return None
