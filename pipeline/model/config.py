"""The model's shape: the `model` config group (conf/model/*.yaml) is validated against this."""

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline.errors import ConfigError
from pipeline.model.pattern import ATTENTION, MAMBA, parse_pattern


@dataclass
class ModelConfig:
    """A Nemotron-H-style hybrid: Mamba-2, attention and squared-ReLU FFN layers by `pattern`."""

    name: str = "tiny"
    """Preset name, used in run names and logs."""
    pattern: str = "M-M*-"
    """One symbol per layer: M Mamba-2, * attention, - FFN; '|' separates pipeline segments."""
    num_layers: Optional[int] = None
    """Optional check: when set, must equal the number of layers in `pattern`."""
    hidden_size: int = 64
    ffn_hidden_size: int = 256
    """Width of the squared-ReLU FFN (up -> relu^2 -> down, not gated)."""
    num_attention_heads: int = 4
    num_query_groups: int = 2
    """Key/value heads (GQA groups)."""
    kv_channels: int = 16
    """Attention head dimension."""
    mamba_num_heads: int = 8
    mamba_head_dim: int = 16
    mamba_num_groups: int = 2
    mamba_state_dim: int = 16
    mamba_conv_kernel: int = 4
    mamba_chunk_size: int = 16
    """Chunk length of the SSD scan (128 in the published models)."""
    vocab_size: int = 4096
    """Tokenizer vocabulary; the embedding is padded to a multiple of `make_vocab_size_divisible_by`."""
    make_vocab_size_divisible_by: int = 128
    seq_length: int = 256
    """Maximum (training) sequence length."""
    layernorm_epsilon: float = 1e-5
    init_method_std: float = 0.02

    def __post_init__(self) -> None:
        layers = self.parsed_pattern().layers
        if self.num_layers is not None and self.num_layers != len(layers):
            raise ConfigError(
                f"model.num_layers={self.num_layers} but model.pattern has {len(layers)} layers; "
                f"fix the pattern or set model.num_layers={len(layers)}"
            )
        positive = (
            "hidden_size ffn_hidden_size num_attention_heads num_query_groups kv_channels "
            "mamba_num_heads mamba_head_dim mamba_num_groups mamba_state_dim mamba_conv_kernel "
            "mamba_chunk_size vocab_size make_vocab_size_divisible_by seq_length"
        ).split()
        for name in positive:
            value = getattr(self, name)
            if value <= 0:
                raise ConfigError(f"model.{name}={value} must be positive")
        if MAMBA in layers and self.mamba_num_heads % self.mamba_num_groups:
            raise ConfigError(
                f"model.mamba_num_heads={self.mamba_num_heads} not divisible by "
                f"model.mamba_num_groups={self.mamba_num_groups}; use heads that are a multiple "
                f"of groups"
            )
        if ATTENTION in layers and self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} not divisible by "
                f"model.num_query_groups={self.num_query_groups}; use heads that are a multiple "
                f"of KV groups"
            )

    def parsed_pattern(self):
        """The validated `Pattern` of this model."""
        return parse_pattern(self.pattern)

    def check_tokenizer(self, tokenizer_vocab_size: int) -> None:
        """The embedding must have a row for every token the tokenizer can produce."""
        if tokenizer_vocab_size > self.vocab_size:
            raise ConfigError(
                f"model.vocab_size={self.vocab_size} is smaller than the tokenizer's vocabulary "
                f"({tokenizer_vocab_size}); set model.vocab_size={tokenizer_vocab_size} or more"
            )

    @property
    def mamba_d_inner(self) -> int:
        """Mamba inner width: heads x head dim (not 2 x hidden for Nano-2 or pruned models)."""
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_in_proj_width(self) -> int:
        """Output width of the fused Mamba input projection [z, x, B, C, dt]."""
        return 2 * self.mamba_d_inner + 2 * self.mamba_num_groups * self.mamba_state_dim + self.mamba_num_heads

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows: vocab_size rounded up to make_vocab_size_divisible_by (times TP upstream)."""
        m = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // m) * m


def write_model_option(model: ModelConfig, root: Path, header: str) -> Path:
    """root/model/NAME.yaml: `model` as a Hydra `model` option with every size explicit (use it with
    `hydra.searchpath=[file://root] model=NAME`); `header` is its first comment line."""
    from omegaconf import OmegaConf

    path = Path(root) / "model" / f"{model.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = {k: v for k, v in dataclasses.asdict(model).items() if v is not None}
    path.write_text(f"# {header}\n{OmegaConf.to_yaml(fields)}")
    return path
