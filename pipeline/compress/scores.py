"""Importance scores of a parent model: what `importance` writes and `search` / `prune` read.

A scores directory holds `scores.safetensors` (one float tensor per unit kind and layer, no pickle)
and `scores.json` (which parent they belong to, how many calibration samples, the layer metrics).
Keys in the tensor file (layer indices are the parent's global ones):

    hidden                      [h]   embedding channels, summed over every block's pre-norm output
    ffn.{i}                     [f]   FFN neurons of layer i (fc2 input)
    query_heads.{i}             [n]   attention query heads of layer i (linear_proj input per head)
    mamba_heads.{i}             [H]   Mamba heads of layer i (x part of in_proj output, per head)
    mamba_channels.{i}          [P]   Mamba head channels of layer i (same channel of every head)
    experts.{i}                 [X]   routed experts of MoE layer i: expected norm of the expert's
                                      weighted output per token (= expert_frequency x expert_output_norm)
    expert_frequency.{i}        [X]   fraction of the calibration tokens routed to each expert (sums to top-k)
    expert_output_norm.{i}      [X]   mean norm of each expert's weighted output over the tokens routed to it
    expert_ffn.{i}              [X, e] neurons of every routed expert of layer i (fc2 input)
    shared_ffn.{i}              [s]   neurons of the shared expert of layer i (fc2 input)
    layers.{metric}             [L]   one value per layer for each of LAYER_METRICS

Higher means more important, for units and layers alike.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.errors import CheckpointError
from pipeline.fs import atomic_write_bytes, replace_dir, storage_error, temporary_sibling

FORMAT = 1
TENSORS = "scores.safetensors"
SIDECAR = "scores.json"
UNIT_KINDS = ("ffn", "query_heads", "mamba_heads", "mamba_channels", "experts", "expert_frequency",
              "expert_output_norm", "expert_ffn", "shared_ffn")
LAYER_METRICS = ("block_influence", "loss_increase", "logit_mse_increase")
"""1 - cos(layer input, layer output) averaged over tokens; the calibration loss increase with that
layer alone removed; the mean squared logit change with that layer alone removed."""


@dataclass(frozen=True)
class ParentIdentity:
    """Which checkpoint scores were computed on: its step directory, step and model config."""

    checkpoint: str
    step: int
    model: dict

    def describe(self) -> str:
        return f"{self.checkpoint} (step {self.step}, model {self.model.get('name')})"


@dataclass
class Scores:
    """Importance of every prunable unit and layer of one parent (see the module docstring)."""

    parent: ParentIdentity
    hidden: torch.Tensor
    units: dict[str, dict[int, torch.Tensor]] = field(default_factory=lambda: {k: {} for k in UNIT_KINDS})
    """unit kind (UNIT_KINDS) -> parent layer index -> scores of that layer's units."""
    layers: dict[str, torch.Tensor] = field(default_factory=dict)
    """metric (LAYER_METRICS) -> [num_layers] scores."""
    samples: int = 0
    """Calibration sequences the unit scores were aggregated over."""

    def check_parent(self, parent: ParentIdentity, where: str | Path) -> None:
        """Refuse scores computed on another parent (different checkpoint, step or model shape)."""
        same = (
            self.parent.model == parent.model
            and self.parent.step == parent.step
            and Path(self.parent.checkpoint).resolve() == Path(parent.checkpoint).resolve()
        )
        if not same:
            raise CheckpointError(
                f"scores {where} were computed on {self.parent.describe()}, not on the parent "
                f"{parent.describe()}; rerun `python -m pipeline.compress importance` or point "
                f"compress.scores_file at that parent's scores"
            )


UNIT_NAMES = {"ffn": "FFN neurons", "query_heads": "query heads", "mamba_heads": "Mamba heads",
              "mamba_channels": "Mamba head channels", "experts": "routed experts", "expert_ffn": "expert neurons",
              "shared_ffn": "shared-expert neurons"}
"""Unit kinds `summary` lists (the expert frequency and output norm are parts of `experts`)."""
SHOWN_LAYERS = 8
"""Layers `summary` lists (the least important: the first a search removes)."""


def summary(scores: Scores, metric: str) -> str:
    """What `importance` scored, in three lines: the parent and calibration size, the units per kind,
    and the least important layers by `metric` with their type (pattern symbol) and score."""
    lines = [f"importance of {scores.parent.describe()} on {scores.samples} calibration sequences"]
    units = [f"hidden {scores.hidden.numel()} channels"]
    for kind, per_layer in scores.units.items():
        if per_layer and kind in UNIT_NAMES:
            widths = ["x".join(map(str, shape)) for shape in sorted({tuple(t.shape) for t in per_layer.values()})]
            layers = f"{len(per_layer)} layer{'s' if len(per_layer) > 1 else ''}"
            units.append(f"{UNIT_NAMES[kind]} {layers} x {'/'.join(widths)}")
    lines.append("  units: " + ", ".join(units))
    if scores.units.get("expert_frequency"):
        per_layer = sorted(scores.units["expert_frequency"].items())
        spans = [f"{i}E {float(t.min()):.3g}-{float(t.max()):.3g}" for i, t in per_layer]
        lines.append("  fraction of tokens routed to each expert, min-max per MoE layer: " + ", ".join(spans))
    if metric in scores.layers:
        values = scores.layers[metric].tolist()
        symbols = [c for c in scores.parent.model.get("pattern", "").split("/")[0] if c != "|"]
        symbols = symbols if len(symbols) == len(values) else ["?"] * len(values)
        order = sorted(range(len(values)), key=values.__getitem__)
        shown = "  ".join(f"{i}{symbols[i]} {values[i]:.3g}" for i in order[:SHOWN_LAYERS])
        more = f"  ... (most important: {order[-1]}{symbols[order[-1]]} {values[order[-1]]:.3g})" \
            if len(order) > SHOWN_LAYERS else ""
        lines.append(f"  {len(values)} layers by {metric}, least important first: {shown}{more}")
    return "\n".join(lines)


def save_scores(scores: Scores, path: str | Path) -> Path:
    """Write `scores` as directory `path` (built aside, swapped in whole)."""
    from safetensors.torch import save

    path = Path(path)
    tensors = {"hidden": scores.hidden}
    for kind, per_layer in scores.units.items():
        tensors.update({f"{kind}.{i}": t for i, t in per_layer.items()})
    tensors.update({f"layers.{m}": t for m, t in scores.layers.items()})
    tensors = {k: v.detach().to(torch.float32).cpu().clone() for k, v in tensors.items()}  # no shared storage
    sidecar = {
        "format": FORMAT,
        "parent": {"checkpoint": scores.parent.checkpoint, "step": scores.parent.step, "model": scores.parent.model},
        "samples": scores.samples,
        "layer_metrics": sorted(scores.layers),
    }
    try:
        tmp = temporary_sibling(path)
        atomic_write_bytes(tmp / TENSORS, save(tensors))
        atomic_write_bytes(tmp / SIDECAR, json.dumps(sidecar, indent=2).encode())
        replace_dir(tmp, path)
    except OSError as e:
        raise storage_error(e, "importance scores", path) from e
    return path


def load_scores(path: str | Path, parent: ParentIdentity | None = None) -> Scores:
    """Read a scores directory; with `parent`, refuse scores of any other parent."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / TENSORS).is_file() or not (path / SIDECAR).is_file():
        raise CheckpointError(
            f"no importance scores at {path} (expected {TENSORS} and {SIDECAR}); run "
            f"`python -m pipeline.compress importance` first or set compress.scores_file"
        )
    sidecar = json.loads((path / SIDECAR).read_text())
    if sidecar.get("format") != FORMAT:
        raise CheckpointError(f"scores {path} have format {sidecar.get('format')}, expected {FORMAT}; rerun importance")
    tensors = load_file(str(path / TENSORS))
    units: dict[str, dict[int, torch.Tensor]] = {k: {} for k in UNIT_KINDS}
    layers = {}
    for key, value in tensors.items():
        kind, _, rest = key.partition(".")
        if kind in units:
            units[kind][int(rest)] = value
        elif kind == "layers":
            layers[rest] = value
    scores = Scores(
        parent=ParentIdentity(**sidecar["parent"]),
        hidden=tensors["hidden"],
        units=units,
        layers=layers,
        samples=sidecar["samples"],
    )
    if parent is not None:
        scores.check_parent(parent, path)
    return scores
