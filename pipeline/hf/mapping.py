"""Tensor names and layouts: the pipeline's checkpoint keys (full, unsharded tensors) <-> HF NemotronH.

The checkpoint side (keys, shapes, fused components) comes from the tensor table in
`pipeline.model.params`; here are the HF names: one table of renames plus six named special cases:
- `Concat`: Mamba `in_proj.weight.{z,x,B,C,dt}` -> HF `in_proj.weight` (rows in that order), and
  `conv1d.{weight,bias}.{x,B,C}` -> HF `conv1d.{weight,bias}`. The checkpoint stores the components
  separately (each TP rank holds a slice of every component), so concatenating them here is right
  whatever TP wrote the checkpoint.
- `SplitQKV`: megatron's fused QKV is grouped per KV group, rows [q heads of group g, k_g, v_g] for
  each g; HF has separate q/k/v_proj with heads in order.
- `Vocab`: the embedding and output layer are padded to `padded_vocab_size` rows in the pipeline;
  the padding is trimmed on export and zero-filled on import.
- The per-layer pre-norm: megatron fuses it into the first linear of the layer
  (`in_proj`/`linear_qkv`/`linear_fc1.layer_norm_weight`), HF has `backbone.layers.{i}.norm.weight`
  (an MoE layer's is megatron's separate `pre_mlp_layernorm`).
- `PerExpert`: megatron stores each routed-expert projection as one [experts, out, in] tensor;
  HF's files hold one tensor per expert, `mixer.experts.{j}.up_proj.weight` (transformers merges
  them into its 3-D parameter when loading, as for the published Nemotron 3 checkpoints).
- `ExpertBias`: the router's `expert_bias` buffer (fp32, checkpointed but not a parameter) is HF's
  `mixer.gate.e_score_correction_bias`, written in fp32 whatever the export dtype (rounding it to
  bf16 would change which experts are chosen); a model without expert bias gets zeros.

Checkpoint keys use the global layer index (layer number - 1), as megatron-core's sharded state dict.

Shapes: V vocab, Vp padded vocab, h hidden, f FFN width, n attention heads, g KV groups, d head dim,
q query heads per KV group (n/g), R heads of one KV group's fused QKV rows (q + 2), E Mamba inner
width (heads x head dim), H Mamba heads, G Mamba groups, N state size, K conv kernel; X routed
experts, e one expert's FFN width, L the experts' input width (latent size, else h).
"""

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from pipeline.model.config import ModelConfig
from pipeline.model.params import (
    EMBEDDING,
    FINAL_NORM,
    LAYER_PREFIX,
    OUTPUT_LAYER,
    checkpoint_shapes,
    layer_key,
    layer_tensors,
)
from pipeline.model.pattern import ATTENTION, MAMBA, MLP, MOE

Shape = tuple[int, ...]
Named = tuple[tuple[str, Shape], ...]
Piece = tuple[int, int, int]
"""(index of a megatron input, first element, element count): a run of one input's row-major elements."""

# Renames within one layer: megatron suffix -> HF suffix (under backbone.layers.{i}.).
LAYER_RENAMES = {
    MAMBA: {
        "mixer.in_proj.layer_norm_weight": "norm.weight",
        "mixer.A_log": "mixer.A_log",
        "mixer.D": "mixer.D",
        "mixer.dt_bias": "mixer.dt_bias",
        "mixer.norm.weight": "mixer.norm.weight",
        "mixer.out_proj.weight": "mixer.out_proj.weight",
    },
    ATTENTION: {
        "self_attention.linear_qkv.layer_norm_weight": "norm.weight",
        "self_attention.linear_proj.weight": "mixer.o_proj.weight",
    },
    MLP: {
        "mlp.linear_fc1.layer_norm_weight": "norm.weight",
        "mlp.linear_fc1.weight": "mixer.up_proj.weight",
        "mlp.linear_fc2.weight": "mixer.down_proj.weight",
    },
    MOE: {
        "pre_mlp_layernorm.weight": "norm.weight",
        "mlp.router.weight": "mixer.gate.weight",
        "mlp.fc1_latent_proj.weight": "mixer.fc1_latent_proj.weight",
        "mlp.fc2_latent_proj.weight": "mixer.fc2_latent_proj.weight",
        "mlp.experts.experts.linear_fc1.weight": "mixer.experts.{}.up_proj.weight",
        "mlp.experts.experts.linear_fc2.weight": "mixer.experts.{}.down_proj.weight",
        "mlp.shared_experts.linear_fc1.weight": "mixer.shared_experts.up_proj.weight",
        "mlp.shared_experts.linear_fc2.weight": "mixer.shared_experts.down_proj.weight",
    },
}
QKV = "self_attention.linear_qkv.weight"
EXPERT_BIAS = "mlp.router.expert_bias"
"""The router's aux-loss-free balancing bias: a checkpointed fp32 buffer [X] (with model.moe.expert_bias)."""
HF_EXPERT_BIAS = "mixer.gate.e_score_correction_bias"
HF_EMBEDDING = "backbone.embeddings.weight"
HF_FINAL_NORM = "backbone.norm_f.weight"
HF_LM_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class Conversion:
    """Tensors converted together: megatron keys/shapes <-> HF names/shapes (a plain rename here)."""

    megatron: Named
    hf: Named
    dtype: torch.dtype | None = None
    """The HF tensors' dtype when it is not the export's."""

    def to_hf(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """HF tensors (in `hf` order) from the megatron ones (in `megatron` order)."""
        return list(tensors)

    def to_megatron(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Megatron tensors (in `megatron` order) from the HF ones (in `hf` order)."""
        return list(tensors)

    def pieces(self) -> list[list[Piece]]:
        """For each HF tensor, the runs of megatron elements it is made of, in order. Every conversion
        here only moves elements, so an export without a dtype change can copy byte ranges."""
        return [[(0, 0, math.prod(self.megatron[0][1]))]]


@dataclass(frozen=True)
class Concat(Conversion):
    """Megatron components concatenated along dim 0 into one HF tensor (Mamba in_proj, conv1d)."""

    def to_hf(self, tensors):
        return [torch.cat(tensors, dim=0)]

    def to_megatron(self, tensors):
        (fused,) = tensors
        return list(torch.split(fused, [shape[0] for _, shape in self.megatron], dim=0))

    def pieces(self):
        return [[(i, 0, math.prod(shape)) for i, (_, shape) in enumerate(self.megatron)]]


@dataclass(frozen=True)
class SplitQKV(Conversion):
    """Megatron's per-KV-group fused QKV [g * (n/g + 2) * d, h] <-> HF q [n*d, h], k and v [g*d, h]."""

    groups: int = 1
    head_dim: int = 1

    def to_hf(self, tensors):
        (qkv,) = tensors
        hidden = qkv.shape[-1]
        qkv_gRdh = qkv.view(self.groups, -1, self.head_dim, hidden)
        q_per_group = qkv_gRdh.shape[1] - 2
        q_gqdh, k_g1dh, v_g1dh = qkv_gRdh.split([q_per_group, 1, 1], dim=1)
        return [t.reshape(-1, hidden) for t in (q_gqdh, k_g1dh, v_g1dh)]

    def to_megatron(self, tensors):
        q, k, v = tensors
        hidden = q.shape[-1]
        parts = [t.view(self.groups, -1, self.head_dim, hidden) for t in (q, k, v)]
        return [torch.cat(parts, dim=1).reshape(-1, hidden)]

    def pieces(self):
        rows, hidden = self.megatron[0][1]
        head = self.head_dim * hidden  # elements of one head's rows
        per_group = rows // (self.groups * self.head_dim)  # R = q + 2 heads
        q = per_group - 2
        return [
            [(0, g * per_group * head, q * head) for g in range(self.groups)],
            [(0, (g * per_group + q) * head, head) for g in range(self.groups)],
            [(0, (g * per_group + q + 1) * head, head) for g in range(self.groups)],
        ]


@dataclass(frozen=True)
class Vocab(Conversion):
    """Embedding/output layer: padded rows [Vp, h] <-> the vocabulary's rows [V, h] (padding zero-filled)."""

    def to_hf(self, tensors):
        (padded,) = tensors
        return [padded[: self.hf[0][1][0]]]

    def to_megatron(self, tensors):
        (trimmed,) = tensors
        padded_rows = self.megatron[0][1][0]
        extra = trimmed.new_zeros((padded_rows - trimmed.shape[0], *trimmed.shape[1:]))
        return [torch.cat([trimmed, extra], dim=0)]

    def pieces(self):
        return [[(0, 0, math.prod(self.hf[0][1]))]]


@dataclass(frozen=True)
class PerExpert(Conversion):
    """Megatron's routed-expert projection [X, out, in] <-> X HF tensors [out, in], one per expert."""

    def to_hf(self, tensors):
        (stacked,) = tensors
        return list(stacked.unbind(0))

    def to_megatron(self, tensors):
        return [torch.stack(tensors)]

    def pieces(self):
        per_expert = math.prod(self.hf[0][1])
        return [[(0, j * per_expert, per_expert)] for j in range(len(self.hf))]


@dataclass(frozen=True)
class ExpertBias(Conversion):
    """The router's expert bias [X] <-> HF's `e_score_correction_bias` (fp32); zeros to HF and
    dropped from HF when the model has no expert bias (no megatron tensor)."""

    def to_hf(self, tensors):
        if not self.megatron:
            return [torch.zeros(self.hf[0][1], dtype=torch.float32)]
        return list(tensors)

    def to_megatron(self, tensors):
        return list(tensors) if self.megatron else []

    def pieces(self):
        # Without an input there is nothing to copy (export computes the zeros).
        return [[(0, 0, self.hf[0][1][0])]] if self.megatron else [[]]


def _moe_extra(model: ModelConfig, index: int) -> list[Conversion]:
    """The expert-bias conversion of the `E` layer at global `index` (it is not in the parameter table)."""
    hf = ((f"backbone.layers.{index}.{HF_EXPERT_BIAS}", (model.moe.num_experts,)),)
    megatron = ((f"{LAYER_PREFIX}.{index}.{EXPERT_BIAS}", (model.moe.num_experts,)),) if model.moe.expert_bias else ()
    return [ExpertBias(megatron, hf, dtype=torch.float32)]


def _layer_conversions(model: ModelConfig, index: int, symbol: str, shapes: dict[str, Shape]) -> list[Conversion]:
    """Conversions of the layer at global `index`, in the table's (HF's) order: a fused Mamba
    parameter's components are concatenated, the fused QKV split, everything else renamed."""
    hf_prefix = f"backbone.layers.{index}."
    out: list[Conversion] = []
    for _, group in itertools.groupby(layer_tensors(model, symbol), key=lambda spec: spec.param):
        specs = list(group)
        megatron = tuple((layer_key(index, spec), shapes[layer_key(index, spec)]) for spec in specs)
        first = specs[0]
        if first.per_expert:
            experts, *shape = megatron[0][1]
            name = hf_prefix + LAYER_RENAMES[symbol][first.key]
            out.append(PerExpert(megatron, tuple((name.format(j), tuple(shape)) for j in range(experts))))
        elif first.component is not None:
            rows = sum(shape[0] for _, shape in megatron)
            fused = first.key.rsplit(".", 1)[0]  # mixer.in_proj.weight, mixer.conv1d.weight, ...
            out.append(Concat(megatron, ((hf_prefix + fused, (rows, *megatron[0][1][1:])),)))
        elif first.key == QKV:
            n, g, d, h = model.num_attention_heads, model.num_query_groups, model.kv_channels, model.hidden_size
            hf = tuple(
                (f"{hf_prefix}mixer.{p}_proj.weight", (rows * d, h)) for p, rows in (("q", n), ("k", g), ("v", g))
            )
            out.append(SplitQKV(megatron, hf, groups=g, head_dim=d))
        else:
            out.append(Conversion(megatron, ((hf_prefix + LAYER_RENAMES[symbol][first.key], megatron[0][1]),)))
        if first.key == "mlp.router.weight":
            out += _moe_extra(model, index)
    return out


def conversions(model: ModelConfig) -> list[Conversion]:
    """Every conversion of `model`, in HF order (embedding, layers in order, final norm, lm_head)."""
    shapes = checkpoint_shapes(model)
    vocab = (model.vocab_size, model.hidden_size)
    out: list[Conversion] = [Vocab(((EMBEDDING, shapes[EMBEDDING]),), ((HF_EMBEDDING, vocab),))]
    for i, symbol in enumerate(model.parsed_pattern().layers):
        out += _layer_conversions(model, i, symbol, shapes)
    out.append(Conversion(((FINAL_NORM, shapes[FINAL_NORM]),), ((HF_FINAL_NORM, shapes[FINAL_NORM]),)))
    out.append(Vocab(((OUTPUT_LAYER, shapes[OUTPUT_LAYER]),), ((HF_LM_HEAD, vocab),)))
    return out


def hf_shapes(model: ModelConfig) -> dict[str, Shape]:
    """Shape of every tensor of the HF model, by name, in HF order."""
    return {name: shape for c in conversions(model) for name, shape in c.hf}


def megatron_shapes(model: ModelConfig) -> dict[str, Shape]:
    """Every checkpoint tensor the conversion reads (parameters plus the routers' expert bias), by key."""
    return {key: shape for c in conversions(model) for key, shape in c.megatron}


def to_hf(model: ModelConfig, get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs one conversion at a time; `get(key)` returns a full megatron tensor."""
    for conversion in conversions(model):
        tensors = conversion.to_hf([get(key) for key, _ in conversion.megatron])
        yield from zip((name for name, _ in conversion.hf), tensors, strict=True)


def to_megatron(model: ModelConfig, get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Megatron (key, full tensor) pairs one conversion at a time; `get(name)` returns an HF tensor."""
    for conversion in conversions(model):
        tensors = conversion.to_megatron([get(name) for name, _ in conversion.hf])
        yield from zip((key for key, _ in conversion.megatron), tensors, strict=True)
