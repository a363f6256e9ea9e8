"""Candidate students of a parent: layers removed per type plus width cuts, inside a budget.

Placeholder for the first commit: the candidate description and the choice of removed layers,
which pruning needs. Enumeration, budgets and the table follow.
"""

from dataclasses import dataclass, replace

import torch

from pipeline.errors import ConfigError
from pipeline.model.config import ModelConfig
from pipeline.model.pattern import ATTENTION, MAMBA, MLP, PIPE, SYMBOL_NAMES

REMOVE_FIELDS = {MAMBA: "remove_mamba", ATTENTION: "remove_attention", MLP: "remove_mlp"}


@dataclass(frozen=True)
class Candidate:
    """One student: how many layers of each type to remove and the widths to keep (None = the
    parent's). Widths are per layer of that type (every layer keeps the same count), heads per
    group (every KV / Mamba group keeps the same count, K/V heads and B/C are never pruned)."""

    remove_mamba: int = 0
    remove_attention: int = 0
    remove_mlp: int = 0
    hidden_size: int | None = None
    ffn_hidden_size: int | None = None
    mamba_heads_per_group: int | None = None
    mamba_head_dim: int | None = None
    query_heads_per_group: int | None = None

    def label(self, parent: ModelConfig) -> str:
        """Short description of what changes relative to `parent`, e.g. `-2M -1* h=96 ffn=384`."""
        parts = [f"-{getattr(self, f)}{s}" for s, f in REMOVE_FIELDS.items() if getattr(self, f)]
        m = student_widths(parent, self)
        names = {"hidden_size": "h", "ffn_hidden_size": "ffn", "mamba_heads_per_group": "mh/g",
                 "mamba_head_dim": "mP", "query_heads_per_group": "q/g"}
        parts += [f"{short}={m[f]}" for f, short in names.items() if m[f] != parent_widths(parent)[f]]
        return " ".join(parts) or "parent"


def parent_widths(parent: ModelConfig) -> dict[str, int]:
    """The parent's value of every Candidate width field."""
    return {
        "hidden_size": parent.hidden_size,
        "ffn_hidden_size": parent.ffn_hidden_size,
        "mamba_heads_per_group": parent.mamba_num_heads // parent.mamba_num_groups,
        "mamba_head_dim": parent.mamba_head_dim,
        "query_heads_per_group": parent.num_attention_heads // parent.num_query_groups,
    }


def student_widths(parent: ModelConfig, candidate: Candidate) -> dict[str, int]:
    """Every width of the student: the candidate's where given, else the parent's."""
    return {k: v if getattr(candidate, k) is None else getattr(candidate, k) for k, v in parent_widths(parent).items()}


def removed_layers(parent: ModelConfig, layer_scores: torch.Tensor, candidate: Candidate) -> list[int]:
    """Parent layer indices the candidate removes: for each type, its `remove_*` least important
    layers of that type by `layer_scores` (ties: the later layer goes first)."""
    symbols = parent.parsed_pattern().layers
    removed = []
    for symbol, name in REMOVE_FIELDS.items():
        count = getattr(candidate, name)
        of_type = [i for i, s in enumerate(symbols) if s == symbol]
        if count > len(of_type) or count < 0:
            raise ConfigError(
                f"cannot remove {count} {SYMBOL_NAMES[symbol]} layers: the parent has {len(of_type)}; "
                f"lower {name}"
            )
        order = sorted(of_type, key=lambda i: (float(layer_scores[i]), -i))
        removed += order[:count]
    return sorted(removed)


def kept_pattern(parent: ModelConfig, kept: list[int]) -> str:
    """The parent's pattern with only the `kept` layers (global indices), segments kept where
    they still hold a layer."""
    segments, start, keep = [], 0, set(kept)
    for segment in parent.parsed_pattern().segments:
        part = "".join(s for i, s in enumerate(segment, start) if i in keep)
        if part:
            segments.append(part)
        start += len(segment)
    if not segments:
        raise ConfigError("the candidate removes every layer; remove fewer layers")
    return PIPE.join(segments)


def student_config(parent: ModelConfig, kept: list[int], widths: dict[str, int], name: str) -> ModelConfig:
    """The student's ModelConfig, every size written explicitly."""
    pattern = kept_pattern(parent, kept)
    return replace(
        parent,
        name=name,
        pattern=pattern,
        num_layers=len(kept),
        hidden_size=widths["hidden_size"],
        ffn_hidden_size=widths["ffn_hidden_size"],
        num_attention_heads=widths["query_heads_per_group"] * parent.num_query_groups,
        num_query_groups=parent.num_query_groups,
        kv_channels=parent.kv_channels,
        mamba_num_heads=widths["mamba_heads_per_group"] * parent.mamba_num_groups,
        mamba_head_dim=widths["mamba_head_dim"],
        mamba_num_groups=parent.mamba_num_groups,
        mamba_state_dim=parent.mamba_state_dim,
    )
