"""The `data` config group: which indexed datasets to train on and how to split them."""

import re
from dataclasses import dataclass, field
from typing import Optional

from pipeline.data.phases import PhaseConfig, check_phase_list
from pipeline.errors import ConfigError


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
