"""Synthetic importance scores for pruning and search tests (random, seeded, positive)."""

import dataclasses

import torch

from pipeline.compress.scores import LAYER_METRICS, ParentIdentity, Scores


def random_scores(model, seed: int = 0, layer_scores: list[float] | None = None, identity=None) -> Scores:
    """Scores for every unit of `model`; every layer metric is `layer_scores` (or random)."""
    gen = torch.Generator().manual_seed(seed)
    layers = model.parsed_pattern().layers
    rand = lambda n: torch.rand(n, generator=gen)  # noqa: E731
    units = {
        "ffn": {i: rand(model.ffn_hidden_size) for i, s in enumerate(layers) if s == "-"},
        "query_heads": {i: rand(model.num_attention_heads) for i, s in enumerate(layers) if s == "*"},
        "mamba_heads": {i: rand(model.mamba_num_heads) for i, s in enumerate(layers) if s == "M"},
        "mamba_channels": {i: rand(model.mamba_head_dim) for i, s in enumerate(layers) if s == "M"},
    }
    moe = model.moe
    if "E" in layers:
        moe_layers = [i for i, s in enumerate(layers) if s == "E"]
        units["experts"] = {i: rand(moe.num_experts) for i in moe_layers}
        units["expert_ffn"] = {i: rand(moe.num_experts * moe.ffn_hidden_size).reshape(moe.num_experts, -1)
                               for i in moe_layers}
        if moe.shared_ffn_hidden_size:
            units["shared_ffn"] = {i: rand(moe.shared_ffn_hidden_size) for i in moe_layers}
    per_layer = torch.tensor(layer_scores) if layer_scores is not None else rand(len(layers))
    return Scores(identity or ParentIdentity("x", 0, dataclasses.asdict(model)), rand(model.hidden_size), units,
                  {m: per_layer for m in LAYER_METRICS}, samples=1)
