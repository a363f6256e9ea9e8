"""Weight initialisation that does not depend on the parallel layout or the backend.

megatron-core initialises many tensors per rank (Mamba's conv, dt_bias and A_log under a CUDA RNG
fork; TE layers on the GPU), so the same seed gives a different model at TP=1 and TP=2, and on CPU
and GPU. Here every parameter is drawn at its full (unsharded) shape from a CPU generator seeded by
(seed, global parameter name), then this rank's slice is copied in. Same seed, same model, for any
TP/PP/VPP/EP/ETP and either backend. A routed expert's parameter is named by its global expert
index (`...experts.linear_fc1.weight{ep_rank * local_experts + i}`) and split over expert-TP ranks.
"""

import math
import re
import zlib
from collections.abc import Callable

import torch
from megatron.core import parallel_state

from pipeline.model.config import ModelConfig
from pipeline.model.params import init_rule, param_keys
from pipeline.model.sharding import full_shape, local_slice

# Mamba-2 defaults (mamba-ssm and megatron-core MambaMixer).
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 0.1, 1e-4
A_INIT_RANGE = (1.0, 16.0)


def _full_value(name: str, shape: tuple[int, ...], model: ModelConfig, gen: torch.Generator) -> torch.Tensor:
    """A freshly drawn full-size value for the parameter called `name`, by its rule in `params.py`."""
    rule = init_rule(name)
    std = model.init_method_std
    if rule == "ones":
        return torch.ones(shape)
    if rule == "scaled_normal":
        return torch.randn(shape, generator=gen) * (std / math.sqrt(2.0 * model.parsed_pattern().num_layers))
    if rule == "normal":
        return torch.randn(shape, generator=gen) * std
    if rule == "conv_uniform":
        # nn.Conv1d's default (kaiming uniform, a=sqrt(5)) for a depthwise kernel: U(+-1/sqrt(K)).
        bound = 1.0 / math.sqrt(model.mamba_conv_kernel)
        return (torch.rand(shape, generator=gen) * 2 - 1) * bound
    if rule == "dt_bias":
        # softplus(dt_bias) log-uniform in [DT_MIN, DT_MAX]: the inverse softplus of such a dt.
        u = torch.rand(shape, generator=gen)
        dt = torch.exp(u * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)).clamp(min=DT_FLOOR)
        return dt + torch.log(-torch.expm1(-dt))
    if rule == "A_log":
        lo, hi = A_INIT_RANGE
        return torch.log(torch.rand(shape, generator=gen) * (hi - lo) + lo)
    raise ValueError(f"init rule {rule!r} of {name!r} has no drawing code; add it in pipeline/model/init.py")


_EXPERT_PARAM = re.compile(r"(.*\.mlp\.experts\.linear_fc[12]\.weight)(\d+)")
_SEQUENTIAL_EXPERT = re.compile(r"(.*\.mlp\.experts\.)local_experts\.(\d+)\.(linear_fc[12]\.weight)")
"""megatron-core's SequentialMLP experts (bench/compress_modelopt.py builds them): named here as the
grouped experts' weights, which they are stored as."""


def global_param_names(chunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters of one model chunk keyed by name with the global layer index (layer_number - 1)
    and, for routed experts, the global expert index."""
    names = {}
    layers = chunk.decoder.layers
    local_to_global = {str(i): str(layer.layer_number - 1) for i, layer in enumerate(layers)}
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    for name, param in chunk.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            local_experts = getattr(getattr(layers[int(parts[2])], "mlp", None), "num_local_experts", 0)
            parts[2] = local_to_global[parts[2]]
            sequential = _SEQUENTIAL_EXPERT.fullmatch(".".join(parts))
            if sequential:
                parts = f"{sequential.group(1)}{sequential.group(3)}{sequential.group(2)}".split(".")
            expert = _EXPERT_PARAM.fullmatch(".".join(parts))
            if expert:
                parts = f"{expert.group(1)}{ep_rank * local_experts + int(expert.group(2))}".split(".")
        names[".".join(parts)] = param
    return names


def _tp_of(name: str) -> tuple[int, int]:
    """(rank, size) of the tensor-parallel group `name` is split over: expert TP for routed experts."""
    if _EXPERT_PARAM.fullmatch(name):
        return parallel_state.get_expert_tensor_parallel_rank(), parallel_state.get_expert_tensor_parallel_world_size()
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


@torch.no_grad()
def _copy_full_values(chunks: list[torch.nn.Module],
                      full_value: Callable[[str, torch.Tensor, int], torch.Tensor]) -> None:
    """Copy this rank's slice of `full_value(global name, param, tp_size)` into every parameter."""
    for chunk in chunks:
        for name, param in global_param_names(getattr(chunk, "module", chunk)).items():
            tp_rank, tp_size = _tp_of(name)
            param.copy_(local_slice(full_value(name, param, tp_size), param, tp_rank, tp_size))


def initialize_weights(chunks: list[torch.nn.Module], model: ModelConfig, seed: int) -> None:
    """Overwrite every parameter of this rank's model chunks with the layout-independent init."""

    def draw(name: str, param: torch.Tensor, tp_size: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        return _full_value(name, full_shape(param, tp_size), model, gen)

    _copy_full_values(chunks, draw)


def load_full_tensors(chunks: list[torch.nn.Module], get_full_tensor: Callable[[str], torch.Tensor]) -> None:
    """Overwrite every parameter with this rank's slice of the full tensors `get_full_tensor(checkpoint key)`
    (any TP/PP/EP layout; a fused Mamba parameter is the concatenation of its stored components, a
    routed expert's parameter its row of the stored [experts, ...] tensor)."""

    def full(name: str, param: torch.Tensor, tp_size: int) -> torch.Tensor:
        expert = _EXPERT_PARAM.fullmatch(name)
        if expert:
            return get_full_tensor(param_keys(name)[0])[int(expert.group(2))]
        return torch.cat([get_full_tensor(k) for k in param_keys(name)])

    _copy_full_values(chunks, full)
