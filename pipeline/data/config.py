"""The `data` config group: which indexed datasets to train on and how to split them."""

import re
from dataclasses import dataclass, field
from typing import Optional

from pipeline.errors import ConfigError


@dataclass
class PhaseConfig:
    """One training phase (`data.phases` entry)."""

    name: str = ""
    """Shown in the console and the metrics (`phase`); unique within the run."""
    start_step: int = 0
    """First optimizer step of this phase (0 for the first phase; strictly increasing)."""
    paths: list[str] = field(default_factory=list)
    """Dataset prefixes of this phase's blend (as data.paths); empty: data.paths."""
    weights: list[float] = field(default_factory=list)
    """Blend weight per path (as data.weights); empty: data.weights when paths is empty, else equal weights."""
    seq_length: Optional[int] = None
    """Tokens per training sequence in this phase (<= model.seq_length); null: train.seq_length."""
    lr_decay: bool = False
    """With optim.schedule=wsd: WSD's decay runs from this phase's start to train.iters (at most one phase)."""


def check_phase_list(phases: list[PhaseConfig]) -> None:
    """ConfigError (one line, naming the field) for phases that contradict each other."""
    names = set()
    for i, phase in enumerate(phases):
        where = f"data.phases[{i}]"
        if not phase.name:
            raise ConfigError(f"{where}.name is empty; give every phase a name (shown in the metrics)")
        if phase.name in names:
            raise ConfigError(f"{where}.name={phase.name!r} is used twice; give every phase its own name")
        names.add(phase.name)
        if i == 0 and phase.start_step != 0:
            raise ConfigError(f"{where}.start_step={phase.start_step}; the first phase starts at step 0")
        if i and phase.start_step <= phases[i - 1].start_step:
            raise ConfigError(
                f"{where}.start_step={phase.start_step} is not after data.phases[{i - 1}].start_step="
                f"{phases[i - 1].start_step}; list the phases in order, each starting later"
            )
        if phase.weights and len(phase.weights) != len(phase.paths):
            raise ConfigError(
                f"{where}.weights has {len(phase.weights)} entries for {len(phase.paths)} paths; give one "
                f"weight per path (or none: equal weights)"
            )
        for j, weight in enumerate(phase.weights):
            if not weight > 0:
                raise ConfigError(f"{where}.weights[{j}]={weight} must be > 0; give a positive weight or remove "
                                  f"the path")
        if phase.seq_length is not None and phase.seq_length < 1:
            raise ConfigError(f"{where}.seq_length={phase.seq_length} must be >= 1 (or null: train.seq_length)")
    decaying = [i for i, phase in enumerate(phases) if phase.lr_decay]
    if len(decaying) > 1:
        raise ConfigError(f"data.phases[{decaying[1]}].lr_decay=true but data.phases[{decaying[0]}] already "
                          f"decays; WSD has one decay: set lr_decay on one phase only")


@dataclass
class DataConfig:
    """Datasets (megatron-core indexed .bin/.idx prefixes) and the tokenizer that made them."""

    tokenizer: str = "data/build/tokenizer"
    """Local tokenizer: a HF tokenizer directory/tokenizer.json or a sentencepiece .model."""
    paths: list[str] = field(default_factory=lambda: ["data/build/corpus_text_document"])
    """Dataset prefixes: a preprocessing output (PREFIX.json listing its shards) or a plain
    megatron-core prefix (PREFIX.bin/.idx)."""
    weights: list[float] = field(default_factory=lambda: [1.0])
    """Blend weight per prefix (relative; a sharded dataset's weight is spread over its shards)."""
    split: str = "98,2,0"
    """train,valid,test proportions of each dataset's documents."""
    cache_dir: Optional[str] = None
    """Where megatron-core caches its sample indices; null means <run_dir>/data_cache."""
    eod_mask_loss: bool = False
    """Mask the loss where the input token is EOD (predicting the next document's first token)."""
    phases: list[PhaseConfig] = field(default_factory=list)
    """Training phases, each with its own blend (and sequence length) from a given step
    (pipeline/data/phases.py, docs/data.md); empty: one blend, data.paths/weights, for the whole run."""

    def __post_init__(self) -> None:
        if not self.tokenizer:
            raise ConfigError("data.tokenizer is empty; give a tokenizer directory, tokenizer.json or .model")
        if not self.paths:
            raise ConfigError("data.paths is empty; list at least one dataset prefix")
        if len(self.weights) != len(self.paths):
            raise ConfigError(
                f"data.weights has {len(self.weights)} entries for {len(self.paths)} data.paths; give "
                f"one weight per path"
            )
        for i, weight in enumerate(self.weights):
            if not weight > 0:
                raise ConfigError(
                    f"data.weights[{i}]={weight} must be > 0; give data.paths[{i}] a positive weight "
                    f"or remove it"
                )
        parts = self.split.split(",")
        if len(parts) != 3 or not all(re.fullmatch(r"\d+(\.\d*)?", p.strip()) for p in parts):
            raise ConfigError(f"data.split={self.split!r}; give three non-negative numbers, e.g. '98,2,0'")
        if float(parts[0]) <= 0:
            raise ConfigError(
                f"data.split={self.split!r} leaves nothing to train on; make the first part > 0"
            )
        check_phase_list(self.phases)
