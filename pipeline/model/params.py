"""The one table of a hybrid model's tensors: checkpoint keys, full shapes by named axes, TP split, init rule.

Every other place that needs to know a parameter's name or shape asks here: parameter counts
(`sizes.py`), weight initialisation (`init.py`), the Hugging Face mapping (`hf/mapping.py`), HF
import and the pruning stage (`compress/`), which slices a tensor along each axis by the units kept.

Keys are the pipeline checkpoint's (megatron-core's global sharded keys): the layer index is global
and Mamba's fused tensors are stored as components (`mixer.in_proj.weight.z`, ...), because each
TP rank holds a slice of every component. `param` names the module parameter a key lives in, as
`named_parameters()` lists it (components of one fused parameter share it).

Axis legend (the size of each comes from `axis_sizes`):
    V   padded vocabulary rows          h   hidden channels
    f   FFN neurons                     E   Mamba inner channels, head-major (H heads x P channels)
    H   Mamba heads                     S   rows of Mamba B or C (G groups x N state)
    K   conv kernel taps                1   a singleton
    QKV fused attention rows, grouped per KV group: g x (n/g query heads + 1 key + 1 value) x d
    Q   attention output channels (n query heads x d)
    X   routed experts (one parameter each)   R   router rows (one per routed expert)
    e   neurons of one routed expert's FFN
    s   shared-expert FFN neurons       L   routed experts' input/output width (latent size, else h)
    l   latent width (latent MoE only)

Routed-expert tensors (leading axis X) are stored as one [experts, ...] tensor per projection, as
megatron-core's TEGroupedMLP stores them, but are one module parameter per local expert:
`mlp.experts.linear_fc1.weight0`, `weight1`, ... (`TensorSpec.per_expert`).
"""

import math
import re
from dataclasses import dataclass

from pipeline.model.config import ModelConfig
from pipeline.model.pattern import ATTENTION, LAYER_SYMBOLS, MAMBA, MLP, MOE

LAYER_PREFIX = "decoder.layers"
EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_norm.weight"
OUTPUT_LAYER = "output_layer.weight"

IN_PROJ_COMPONENTS = ("z", "x", "B", "C", "dt")
CONV_COMPONENTS = ("x", "B", "C")
_IN_PROJ_ROWS = {"z": "E", "x": "E", "B": "S", "C": "S", "dt": "H"}

INIT_RULES = ("ones", "normal", "scaled_normal", "conv_uniform", "dt_bias", "A_log")
"""How `pipeline.model.init` draws a tensor: 1.0; N(0, std); N(0, std / sqrt(2 * layers)) for the
linears writing into the residual stream; nn.Conv1d's default; Mamba-2's dt and A ranges."""


@dataclass(frozen=True)
class TensorSpec:
    """One stored tensor: its key (relative to the layer for layer tensors), axes and how it is made."""

    key: str
    axes: tuple[str, ...]
    param: str
    """The module parameter holding it (fused Mamba tensors hold several components)."""
    tp_axis: int | None
    """Axis split over tensor-parallel ranks; None when every TP rank holds all of it (norms)."""
    init: str

    @property
    def per_expert(self) -> bool:
        """One module parameter per routed expert (`{param}{i}`), stored as one [experts, ...] tensor."""
        return self.axes[0] == "X"

    @property
    def component(self) -> str | None:
        """`z`, `x`, `B`, `C` or `dt` for a component of a fused Mamba tensor, else None."""
        if self.key == self.param or self.per_expert:
            return None
        return self.key.rsplit(".", 1)[1]


def _mamba() -> tuple[TensorSpec, ...]:
    norm = TensorSpec("mixer.in_proj.layer_norm_weight", ("h",), "mixer.in_proj.layer_norm_weight", None, "ones")
    in_proj = tuple(
        TensorSpec(f"mixer.in_proj.weight.{c}", (_IN_PROJ_ROWS[c], "h"), "mixer.in_proj.weight", 0, "normal")
        for c in IN_PROJ_COMPONENTS
    )
    conv_w = tuple(
        TensorSpec(f"mixer.conv1d.weight.{c}", (_IN_PROJ_ROWS[c], "1", "K"), "mixer.conv1d_weight", 0, "conv_uniform")
        for c in CONV_COMPONENTS
    )
    conv_b = tuple(
        TensorSpec(f"mixer.conv1d.bias.{c}", (_IN_PROJ_ROWS[c],), "mixer.conv1d_bias", 0, "conv_uniform")
        for c in CONV_COMPONENTS
    )
    rest = (
        TensorSpec("mixer.A_log", ("H",), "mixer.A_log", 0, "A_log"),
        TensorSpec("mixer.D", ("H",), "mixer.D", 0, "ones"),
        TensorSpec("mixer.dt_bias", ("H",), "mixer.dt_bias", 0, "dt_bias"),
        TensorSpec("mixer.norm.weight", ("E",), "mixer.norm.weight", 0, "ones"),
        TensorSpec("mixer.out_proj.weight", ("h", "E"), "mixer.out_proj.weight", 1, "scaled_normal"),
    )
    return (norm, *in_proj, *conv_w, *conv_b, *rest)


def _plain(key: str, axes: tuple[str, ...], tp_axis: int | None, init: str) -> TensorSpec:
    return TensorSpec(key, axes, key, tp_axis, init)


LAYER_TENSORS: dict[str, tuple[TensorSpec, ...]] = {
    MAMBA: _mamba(),
    ATTENTION: (
        _plain("self_attention.linear_qkv.layer_norm_weight", ("h",), None, "ones"),
        _plain("self_attention.linear_qkv.weight", ("QKV", "h"), 0, "normal"),
        _plain("self_attention.linear_proj.weight", ("h", "Q"), 1, "scaled_normal"),
    ),
    MLP: (
        _plain("mlp.linear_fc1.layer_norm_weight", ("h",), None, "ones"),
        _plain("mlp.linear_fc1.weight", ("f", "h"), 0, "normal"),
        _plain("mlp.linear_fc2.weight", ("h", "f"), 1, "scaled_normal"),
    ),
}
"""Tensors of one layer of each type, in the order Hugging Face lists them (pre-norm first)."""

LAYER_TENSORS[MOE] = (
    _plain("pre_mlp_layernorm.weight", ("h",), None, "ones"),
    _plain("mlp.router.weight", ("R", "h"), None, "normal"),
    # megatron-core's TEGroupedMLP (and SequentialMLP) store the experts under `experts.experts.`.
    TensorSpec("mlp.experts.experts.linear_fc1.weight", ("X", "e", "L"), "mlp.experts.linear_fc1.weight", 1, "normal"),
    TensorSpec("mlp.experts.experts.linear_fc2.weight", ("X", "L", "e"), "mlp.experts.linear_fc2.weight", 2,
               "scaled_normal"),
    _plain("mlp.shared_experts.linear_fc1.weight", ("s", "h"), 0, "normal"),
    _plain("mlp.shared_experts.linear_fc2.weight", ("h", "s"), 1, "scaled_normal"),
)
"""The `E` layer with a shared expert and without latent projections; `layer_tensors` gives the
table of a given model (no shared expert, latent projections). The router's `expert_bias` is a
buffer (stored, not a parameter) and not listed."""

MOE_LATENT_TENSORS = (
    _plain("mlp.fc1_latent_proj.weight", ("l", "h"), None, "normal"),
    _plain("mlp.fc2_latent_proj.weight", ("h", "l"), None, "scaled_normal"),
)
"""Latent MoE's down/up projections around the routed experts (replicated over TP, TELinear
`parallel_mode="duplicated"` in megatron-core's MoELayer)."""

EMBEDDING_TENSOR = _plain(EMBEDDING, ("V", "h"), 0, "normal")
FINAL_NORM_TENSOR = _plain(FINAL_NORM, ("h",), None, "ones")
OUTPUT_TENSOR = _plain(OUTPUT_LAYER, ("V", "h"), 0, "normal")


def axis_sizes(model: ModelConfig) -> dict[str, int]:
    """The size of every axis symbol for `model` (see the module legend)."""
    n, g, d = model.num_attention_heads, model.num_query_groups, model.kv_channels
    return {
        "V": model.padded_vocab_size,
        "h": model.hidden_size,
        "f": model.ffn_hidden_size,
        "E": model.mamba_d_inner,
        "H": model.mamba_num_heads,
        "S": model.mamba_num_groups * model.mamba_state_dim,
        "K": model.mamba_conv_kernel,
        "1": 1,
        "QKV": (n + 2 * g) * d,
        "Q": n * d,
        "X": model.moe.num_experts,
        "R": model.moe.num_experts,
        "e": model.moe.ffn_hidden_size,
        "s": model.moe.shared_ffn_hidden_size,
        "L": model.moe.latent_size or model.hidden_size,
        "l": model.moe.latent_size or 0,
    }


def layer_tensors(model: ModelConfig, symbol: str) -> tuple[TensorSpec, ...]:
    """The tensors of one layer of type `symbol` in `model` (the MoE table depends on its options)."""
    if symbol not in LAYER_TENSORS:
        raise ValueError(f"unknown layer symbol {symbol!r}; use one of {''.join(LAYER_SYMBOLS)}")
    specs = LAYER_TENSORS[symbol]
    if symbol == MOE:
        if not model.moe.shared_ffn_hidden_size:
            specs = tuple(s for s in specs if "shared_experts" not in s.key)
        if model.moe.latent_size:
            specs = (*specs[:2], *MOE_LATENT_TENSORS, *specs[2:])
    return specs


def shape_of(spec: TensorSpec, model: ModelConfig) -> tuple[int, ...]:
    """Full (unsharded) shape of `spec` for `model`."""
    sizes = axis_sizes(model)
    return tuple(sizes[a] for a in spec.axes)


def layer_key(index: int, spec: TensorSpec) -> str:
    """The checkpoint key of a layer tensor at global layer `index`."""
    return f"{LAYER_PREFIX}.{index}.{spec.key}"


def model_tensors(model: ModelConfig) -> list[tuple[str, int | None, TensorSpec]]:
    """(checkpoint key, global layer index or None, spec) for every tensor of `model`, in HF order:
    embedding, each layer in order, final norm, output layer."""
    out: list[tuple[str, int | None, TensorSpec]] = [(EMBEDDING, None, EMBEDDING_TENSOR)]
    for i, symbol in enumerate(model.parsed_pattern().layers):
        out += [(layer_key(i, spec), i, spec) for spec in layer_tensors(model, symbol)]
    out += [(FINAL_NORM, None, FINAL_NORM_TENSOR), (OUTPUT_LAYER, None, OUTPUT_TENSOR)]
    return out


def checkpoint_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Full shape of every model tensor in a pipeline checkpoint, by key."""
    return {key: shape_of(spec, model) for key, _, spec in model_tensors(model)}


def local_numel(spec: TensorSpec, model: ModelConfig, tp: int = 1, etp: int = 1) -> int:
    """Elements of one module parameter of `spec` on one rank: a routed expert's (of its etp shard)
    for per-expert tensors, else this tp rank's part of the whole tensor."""
    shape = shape_of(spec, model)
    if spec.per_expert:
        numel = math.prod(shape[1:])
        return numel // etp if spec.tp_axis is not None else numel
    numel = math.prod(shape)
    return numel // tp if spec.tp_axis is not None else numel


def parameter_numels(model: ModelConfig, tp: int = 1, ep: int = 1, etp: int = 1) -> dict[str, int]:
    """Elements of every module parameter on one rank (of EP rank 0 for routed experts), keyed as
    `HybridModel.named_parameters()` lists them with pipeline parallel size 1 (fused Mamba
    parameters sum their components; routed experts are `{param}{i}` for the num_experts / ep local ones)."""
    out: dict[str, int] = {}
    for key, index, spec in model_tensors(model):
        name = key if index is None else f"{LAYER_PREFIX}.{index}.{spec.param}"
        numel = local_numel(spec, model, tp, etp)
        if spec.per_expert:
            for i in range(model.moe.num_experts // ep):
                out[f"{name}{i}"] = numel
        else:
            out[name] = out.get(name, 0) + numel
    return out


def layer_param_count(model: ModelConfig, symbol: str) -> int:
    """Parameters of one layer of type `symbol` (`M`, `*`, `-` or `E`, all experts counted)."""
    return sum(math.prod(shape_of(spec, model)) for spec in layer_tensors(model, symbol))


def routed_expert_param_count(model: ModelConfig) -> int:
    """Parameters of one routed expert of one `E` layer (its fc1 and fc2)."""
    return sum(math.prod(shape_of(spec, model)[1:]) for spec in layer_tensors(model, MOE) if spec.per_expert)


def param_keys(param_name: str) -> list[str]:
    """Checkpoint keys stored for the module parameter `param_name` (global name, as in
    `parameter_numels`), in the order their tensors concatenate along dim 0 into it: the
    components of a fused Mamba parameter, else the name itself."""
    if not param_name.startswith(LAYER_PREFIX + "."):
        return [param_name]
    index, param = param_name[len(LAYER_PREFIX) + 1 :].split(".", 1)
    for spec in _all_layer_specs():
        if spec.per_expert and re.fullmatch(rf"{re.escape(spec.param)}\d+", param):
            # One expert's parameter is one slice of the stored [experts, ...] tensor.
            return [layer_key(int(index), spec)]
    for specs in LAYER_TENSORS.values():
        keys = [layer_key(int(index), spec) for spec in specs if spec.param == param]
        if keys:
            return keys
    raise ValueError(f"no parameter {param_name!r} in the table; add it to pipeline/model/params.py")


def _all_layer_specs() -> tuple[TensorSpec, ...]:
    return (*(s for t in LAYER_TENSORS.values() for s in t), *MOE_LATENT_TENSORS)


def init_rule(param_name: str) -> str:
    """The init rule of a module parameter, from its name (any prefix, e.g. `decoder.layers.3.`;
    routed experts' parameters end in their expert index)."""
    for spec in (EMBEDDING_TENSOR, FINAL_NORM_TENSOR, OUTPUT_TENSOR, *_all_layer_specs()):
        suffix = r"\d+" if spec.per_expert else ""
        if re.fullmatch(rf"(.*\.)?{re.escape(spec.param)}{suffix}", param_name):
            return spec.init
    raise ValueError(f"no parameter {param_name!r} in the table; add it to pipeline/model/params.py")
