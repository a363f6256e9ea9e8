"""Layer specs: megatron-core's Transformer Engine spec (GPU) and the portable one (CPU).

Both produce the same module tree and parameter names; only the classes doing the math differ.
"""

import copy
from functools import partial

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.hybrid.hybrid_block import HybridStackSubmodules
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mamba_mixer import MambaMixerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import GroupedMLPSubmodules, TEGroupedMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    MoETransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
)

from pipeline.model.config import ModelConfig
from pipeline.model.portable.experts import PortableColumnParallelGroupedLinear, PortableRowParallelGroupedLinear
from pipeline.model.portable.layers import (
    PortableCoreAttention,
    PortableHybridStack,
    PortableMambaMixer,
    PortableNormColumnParallelLinear,
    PortableRMSNorm,
)

BACKENDS = ("te", "portable")


def _mixer_params(model: ModelConfig) -> dict:
    return {"d_conv": model.mamba_conv_kernel, "chunk_size": model.mamba_chunk_size}


def _portable_moe_layer() -> ModuleSpec:
    """The `E` layer as the TE spec builds it (MoETransformerLayer: pre-MLP norm + MoELayer with
    TEGroupedMLP experts and a shared expert), with portable norm and grouped linears."""
    experts = partial(
        TEGroupedMLP,
        submodules=GroupedMLPSubmodules(
            linear_fc1=PortableColumnParallelGroupedLinear, linear_fc2=PortableRowParallelGroupedLinear
        ),
    )
    shared = partial(
        SharedExpertMLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    )
    return ModuleSpec(
        module=MoETransformerLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=PortableRMSNorm,
            mlp=partial(MoELayer, submodules=MoESubmodules(experts=experts, shared_experts=shared)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def portable_stack_spec(model: ModelConfig) -> ModuleSpec:
    """The hybrid stack built from plain PyTorch / megatron-core tensor-parallel layers."""
    return ModuleSpec(
        module=PortableHybridStack,
        submodules=HybridStackSubmodules(
            mamba_layer=ModuleSpec(
                module=MambaLayer,
                submodules=MambaLayerSubmodules(
                    mixer=ModuleSpec(
                        module=PortableMambaMixer,
                        params=_mixer_params(model),
                        submodules=MambaMixerSubmodules(
                            in_proj=PortableNormColumnParallelLinear, out_proj=RowParallelLinear
                        ),
                    ),
                    mamba_bda=get_bias_dropout_add,
                ),
            ),
            attention_layer=ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    self_attention=ModuleSpec(
                        module=SelfAttention,
                        params={"attn_mask_type": AttnMaskType.causal},
                        submodules=SelfAttentionSubmodules(
                            linear_qkv=PortableNormColumnParallelLinear,
                            core_attention=PortableCoreAttention,
                            linear_proj=RowParallelLinear,
                        ),
                    ),
                    self_attn_bda=get_bias_dropout_add,
                ),
            ),
            mlp_layer=ModuleSpec(
                module=MLPLayer,
                submodules=TransformerLayerSubmodules(
                    mlp=partial(
                        MLP.as_mlp_submodule,
                        submodules=MLPSubmodules(
                            linear_fc1=PortableNormColumnParallelLinear, linear_fc2=RowParallelLinear
                        ),
                    ),
                    mlp_bda=get_bias_dropout_add,
                ),
            ),
            moe_layer=_portable_moe_layer(),
        ),
    )


def te_stack_spec(model: ModelConfig) -> ModuleSpec:
    """megatron-core's Transformer Engine hybrid spec with this model's conv kernel and chunk size."""
    try:
        from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec
    except ImportError as e:
        raise ImportError(
            "the GPU backend needs Transformer Engine and mamba-ssm: pip install '.[gpu]' "
            "(or use the NVIDIA container); on CPU use device=cpu"
        ) from e
    spec = copy.deepcopy(hybrid_stack_spec)
    spec.submodules.mamba_layer.submodules.mixer.params = _mixer_params(model)
    return spec


def stack_spec(model: ModelConfig, backend: str) -> ModuleSpec:
    """The layer spec for `backend` ('te' or 'portable')."""
    if backend == "te":
        return te_stack_spec(model)
    if backend == "portable":
        return portable_stack_spec(model)
    raise ValueError(f"unknown backend {backend!r}; use one of {BACKENDS}")
