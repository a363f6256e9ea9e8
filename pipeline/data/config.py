"""The `data` config group: which indexed datasets to train on and how to split them."""

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    """Datasets (megatron-core indexed .bin/.idx prefixes) and the tokenizer that made them."""

    tokenizer: str = "data/tokenizer"
    """Local tokenizer: a HF tokenizer directory/tokenizer.json or a sentencepiece .model."""
    paths: list[str] = field(default_factory=lambda: ["data/build/corpus_text_document"])
    """Dataset prefixes (without .bin/.idx)."""
    weights: list[float] = field(default_factory=lambda: [1.0])
    """Blend weight per prefix."""
    split: str = "98,2,0"
    """train,valid,test proportions."""
