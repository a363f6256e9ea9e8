"""Hugging Face NemotronH `config.json` <-> the pipeline's `ModelConfig`.

The exported config is read by transformers' native `NemotronHConfig` (>= 5.3) and by NVIDIA's older
remote-code reader (`configuration_nemotron_h.py` on the Hub), which take the same attribute names
(`n_groups`, `conv_kernel`, `chunk_size`, `time_step_*`); the old reader also needs
`num_hidden_layers` equal to the pattern length and some of its attention code reads
`attention_head_dim`, so both head-dim names are written.

The time-step clamp: transformers' native Mamba mixer computes dt = softplus(dt + dt_bias) and then
clamps dt >= `time_step_min` (default 1e-3; it ignores `time_step_limit`), while megatron-core does
not clamp. Export writes `time_step_min` = the smallest normal float32, so the clamp only touches
values already below 1.2e-38 and both compute the same function (tests/unit/test_hf_export.py
shows the default clamp would change the logits). Not 0: `_init_weights` draws dt_bias from
log(time_step_min) when a model is created without weights. `time_step_limit`, which the older
reader clamps with, is left out: both readers default it to (0, inf), and writing it needs
`Infinity`, which is not standard JSON. Importing a config with a larger `time_step_min` (the
published ones have 1e-3) is allowed: the pipeline then differs from that HF model only where
softplus(dt + dt_bias) < time_step_min; `import_hf` says so.

The Mamba gated RMSNorm: megatron-core hard-codes eps 1e-5 while HF uses `layer_norm_epsilon`
for it; they agree for the usual 1e-5.

MoE (`E`) layers: transformers' `NemotronHTopkRouter` always computes sigmoid scores in fp32, adds
`e_score_correction_bias` for the top-k choice only, takes the routing weights from the unbiased
scores, divides them by their sum when `norm_topk_prob` and multiplies by `routed_scaling_factor`;
it keeps the `n_group` x `topk_group` groups with the best top-2 score sums. megatron-core's
sigmoid router (`topk_routing_with_score_function`) does the same, normalising exactly when
top_k > 1 and ranking groups by their top-(top_k / topk_groups) sums. So a model exports when it
routes by sigmoid, has a shared expert (HF always builds one) and its group ranking uses two
experts per group (or there is one group); `moe_export_refusal` names the field otherwise. A model
without expert bias exports a zero `e_score_correction_bias`.
"""

from pipeline.errors import ConversionError
from pipeline.model.config import ModelConfig, MoEConfig
from pipeline.model.pattern import ATTENTION, MAMBA, MLP, MOE, PIPE

TIME_STEP_MIN = 1.1754943508222875e-38
"""torch.finfo(torch.float32).tiny: the HF dt clamp that changes nothing (see the module docstring)."""

DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32"}

# HF `layers_block_type` names (old and new spellings) and pattern symbols, for configs that give a list.
BLOCK_TYPES = {
    "mamba": MAMBA,
    "linear_attention": MAMBA,
    "attention": ATTENTION,
    "full_attention": ATTENTION,
    "mlp": MLP,
    "moe": "E",
}

# Settings the pipeline's layers hard-code: an HF config with another value cannot be represented.
FIXED = {
    "mlp_hidden_act": "relu2",
    "mamba_hidden_act": "silu",
    "tie_word_embeddings": False,
    "use_bias": False,
    "mlp_bias": False,
    "attention_bias": False,
    "mamba_proj_bias": False,
    "use_conv_bias": True,
    "residual_in_fp32": False,
    "sliding_window": None,
    "num_nextn_predict_layers": 0,
}

SYMBOL_HELP = "'M' (Mamba-2), '*' (attention), '-' (FFN) and 'E' (MoE)"
HF_GROUP_TOPK = 2
"""transformers ranks expert groups by the sum of their best two scores (NemotronHTopkRouter)."""


def hf_config(
    model: ModelConfig,
    dtype: str,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> dict:
    """The config.json dict of `model` exported with weights in `dtype` (bf16 or fp32).

    `vocab_size` is the model's (unpadded) vocabulary: the padding rows are trimmed on export.
    """
    pattern = model.pattern.replace(PIPE, "")
    d_inner = model.mamba_d_inner
    config = {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "torch_dtype": DTYPE_NAMES[dtype],
        "dtype": DTYPE_NAMES[dtype],
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "num_hidden_layers": len(pattern),
        "hybrid_override_pattern": pattern,
        "intermediate_size": model.ffn_hidden_size,
        "mlp_hidden_act": FIXED["mlp_hidden_act"],
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "head_dim": model.kv_channels,
        "attention_head_dim": model.kv_channels,
        "mamba_num_heads": model.mamba_num_heads,
        "mamba_head_dim": model.mamba_head_dim,
        "ssm_state_size": model.mamba_state_dim,
        "n_groups": model.mamba_num_groups,
        "conv_kernel": model.mamba_conv_kernel,
        "chunk_size": model.mamba_chunk_size,
        "mamba_hidden_act": FIXED["mamba_hidden_act"],
        "time_step_min": TIME_STEP_MIN,
        "time_step_max": 0.1,
        "time_step_floor": 1e-4,
        "layer_norm_epsilon": model.layernorm_epsilon,
        "initializer_range": model.init_method_std,
        "max_position_embeddings": model.seq_length,
        "rescale_prenorm_residual": True,
        "use_cache": True,
        "num_logits_to_keep": 1,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }
    config.update({k: v for k, v in FIXED.items() if k not in config})
    if MOE in pattern:
        config.update(_hf_moe_config(model.moe))
    if d_inner % model.hidden_size == 0:
        # Informational (readers use mamba_num_heads * mamba_head_dim); not integral for Nano-2 shapes.
        config["expand"] = d_inner // model.hidden_size
    return config


def _hf_moe_config(moe: MoEConfig) -> dict:
    """The MoE fields of config.json (`moe_export_refusal` has passed)."""
    return {
        "n_routed_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": moe.ffn_hidden_size,
        "moe_shared_expert_intermediate_size": moe.shared_ffn_hidden_size,
        "n_shared_experts": 1,
        "moe_latent_size": moe.latent_size,
        # megatron-core divides the top-k sigmoid weights by their sum only for top_k > 1.
        "norm_topk_prob": moe.top_k > 1,
        "routed_scaling_factor": moe.scaling_factor or 1.0,
        "n_group": moe.num_groups or 1,
        "topk_group": moe.topk_groups or 1,
    }


def _group_routing_problem(experts: int, top_k: int, groups: int, topk_groups: int) -> str | None:
    """Why transformers' group-limited routing differs from megatron-core's, or None."""
    if experts // groups < HF_GROUP_TOPK:
        return (
            f"{experts // groups} expert(s) per group: transformers ranks groups by their best {HF_GROUP_TOPK} "
            f"experts and needs at least {HF_GROUP_TOPK} per group"
        )
    if groups > 1 and topk_groups < groups and top_k // topk_groups != HF_GROUP_TOPK:
        return (
            f"megatron-core ranks expert groups by their best top_k // topk_groups = {top_k // topk_groups} "
            f"scores, transformers by their best {HF_GROUP_TOPK}"
        )
    return None


def transformers_has_latent_moe() -> bool:
    """Whether the installed transformers' NemotronH reads `moe_latent_size` (latent MoE)."""
    try:
        from transformers import NemotronHConfig
    except ImportError:
        return False
    return hasattr(NemotronHConfig(), "moe_latent_size")


def moe_export_refusal(model: ModelConfig) -> None:
    """ConversionError naming the model.moe field that transformers' NemotronH cannot represent
    (see the module docstring); nothing for a model without `E` layers."""
    if MOE not in model.parsed_pattern().layers:
        return
    moe = model.moe
    if moe.score_function != "sigmoid":
        raise ConversionError(
            f"model.moe.score_function={moe.score_function!r}: transformers' NemotronH router only scores "
            f"experts with a sigmoid, so this model cannot be exported; only score_function=sigmoid models export"
        )
    if not moe.shared_ffn_hidden_size:
        raise ConversionError(
            "model.moe.shared_ffn_hidden_size=0: transformers' NemotronH MoE layer always has a shared expert, "
            "so a model without one cannot be exported"
        )
    problem = _group_routing_problem(moe.num_experts, moe.top_k, moe.num_groups or 1, moe.topk_groups or 1)
    if problem:
        raise ConversionError(
            f"model.moe.num_groups={moe.num_groups}, topk_groups={moe.topk_groups}, top_k={moe.top_k}, "
            f"num_experts={moe.num_experts}: {problem}; this group routing cannot be exported"
        )
    if moe.latent_size is not None and not transformers_has_latent_moe():
        raise ConversionError(
            f"model.moe.latent_size={moe.latent_size}: the installed transformers' NemotronH has no "
            f"moe_latent_size (latent MoE); upgrade transformers to export this model"
        )


def moe_export_notes(model: ModelConfig) -> list[str]:
    """Options that export but change what transformers computes a little (training-time behaviour)."""
    if MOE not in model.parsed_pattern().layers:
        return []
    moe, notes = model.moe, []
    if moe.capacity_factor is not None:
        notes.append(
            f"model.moe.capacity_factor={moe.capacity_factor}: the pipeline drops tokens beyond an expert's "
            f"capacity, transformers never does (outputs differ only for dropped tokens)"
        )
    if moe.router_dtype != "fp32":
        notes.append(f"model.moe.router_dtype={moe.router_dtype}: transformers computes the router in fp32")
    return notes


def hf_pattern(config: dict) -> str:
    """The layer pattern of an HF config (`hybrid_override_pattern` or `layers_block_type`)."""
    if "hybrid_override_pattern" in config:
        pattern = config["hybrid_override_pattern"]
    elif "layers_block_type" in config:
        unknown = sorted({t for t in config["layers_block_type"] if t not in BLOCK_TYPES})
        if unknown:
            raise ConversionError(
                f"HF config layers_block_type has unknown layer type(s) {unknown}; the pipeline builds "
                f"{SYMBOL_HELP} layers"
            )
        pattern = "".join(BLOCK_TYPES[t] for t in config["layers_block_type"])
    else:
        raise ConversionError("HF config has neither hybrid_override_pattern nor layers_block_type; is it NemotronH?")
    bad = sorted({c for c in pattern if c not in (MAMBA, ATTENTION, MLP, MOE)})
    if bad:
        names = {"E": " (MoE)", "G": " (gated delta net)", "D": " (DSA attention)"}
        listed = ", ".join(f"{c!r}{names.get(c, '')}" for c in bad)
        raise ConversionError(
            f"HF config pattern {pattern!r} has layer symbol(s) {listed} that the pipeline cannot "
            f"represent; it builds {SYMBOL_HELP} layers only"
        )
    return pattern


def _required(config: dict, *names: str):
    for name in names:
        if name in config and config[name] is not None:
            return config[name]
    raise ConversionError(f"HF config.json has no {' or '.join(names)}; is it a complete NemotronH config?")


def _optional(config: dict, default, *names: str):
    for name in names:
        if name in config and config[name] is not None:
            return config[name]
    return default


def _size(config: dict, needed: bool, default, *names: str):
    """A size the pattern needs (required) or one it does not use (the pipeline default if absent)."""
    return _required(config, *names) if needed else _optional(config, default, *names)


def model_config_from_hf(config: dict, name: str) -> ModelConfig:
    """The ModelConfig of an HF NemotronH config.json dict; ConversionError when not representable."""
    model_type = config.get("model_type")
    if model_type != "nemotron_h":
        raise ConversionError(
            f"HF config model_type={model_type!r}; only NemotronH (model_type 'nemotron_h') checkpoints can be imported"
        )
    pattern = hf_pattern(config)
    layers = config.get("num_hidden_layers")
    if layers is not None and layers != len(pattern):
        raise ConversionError(
            f"HF config num_hidden_layers={layers} but its pattern has {len(pattern)} layers; fix config.json"
        )
    for key, expected in FIXED.items():
        value = config.get(key, expected)
        if value != expected:
            raise ConversionError(f"HF config {key}={value!r}; the pipeline only builds {key}={expected!r} models")
    head_dims = {config[k] for k in ("head_dim", "attention_head_dim") if config.get(k) is not None}
    if len(head_dims) > 1:
        raise ConversionError(
            f"HF config head_dim={config['head_dim']} and attention_head_dim={config['attention_head_dim']} "
            f"disagree; fix config.json"
        )
    d = ModelConfig()
    att, mamba, mlp = ATTENTION in pattern, MAMBA in pattern, MLP in pattern
    return ModelConfig(
        name=name,
        pattern=pattern,
        hidden_size=_required(config, "hidden_size"),
        ffn_hidden_size=_size(config, mlp, d.ffn_hidden_size, "intermediate_size"),
        num_attention_heads=_size(config, att, d.num_attention_heads, "num_attention_heads"),
        num_query_groups=_size(config, att, d.num_query_groups, "num_key_value_heads", "num_attention_heads"),
        kv_channels=_size(config, att, d.kv_channels, "head_dim", "attention_head_dim"),
        mamba_num_heads=_size(config, mamba, d.mamba_num_heads, "mamba_num_heads"),
        mamba_head_dim=_size(config, mamba, d.mamba_head_dim, "mamba_head_dim"),
        mamba_num_groups=_size(config, mamba, d.mamba_num_groups, "n_groups", "mamba_n_groups"),
        mamba_state_dim=_size(config, mamba, d.mamba_state_dim, "ssm_state_size"),
        mamba_conv_kernel=_optional(config, 4, "conv_kernel", "mamba_d_conv"),
        mamba_chunk_size=_optional(config, 128, "chunk_size", "mamba_chunk_size"),
        vocab_size=_required(config, "vocab_size"),
        seq_length=_optional(config, 4096, "max_position_embeddings"),
        layernorm_epsilon=_optional(config, 1e-5, "layer_norm_epsilon", "rms_norm_eps"),
        init_method_std=_optional(config, 0.02, "initializer_range"),
        moe=moe_config_from_hf(config) if MOE in pattern else MoEConfig(),
    )


def moe_config_from_hf(config: dict) -> MoEConfig:
    """The MoEConfig of an HF config with `moe` layers; ConversionError naming the HF field whose
    routing megatron-core computes differently (see the module docstring).

    The router is sigmoid with an expert bias (transformers always has `e_score_correction_bias`),
    so training the import balances experts aux-loss free; the loss options, which config.json does
    not record, keep the pipeline's defaults (set model.moe.* when training)."""
    top_k = _required(config, "num_experts_per_tok")
    experts = _required(config, "n_routed_experts", "num_local_experts")
    normalise = _optional(config, True, "norm_topk_prob")
    if normalise != (top_k > 1):
        raise ConversionError(
            f"HF config norm_topk_prob={normalise} with num_experts_per_tok={top_k}: megatron-core divides the "
            f"top-k routing weights by their sum exactly when top-k > 1, so this routing cannot be imported"
        )
    groups, topk_groups = _optional(config, 1, "n_group"), _optional(config, 1, "topk_group")
    problem = _group_routing_problem(experts, top_k, groups, topk_groups)
    if problem:
        raise ConversionError(f"HF config n_group={groups}, topk_group={topk_groups}: {problem}; it cannot be imported")
    shared = _required(config, "moe_shared_expert_intermediate_size")
    if shared <= 0:
        raise ConversionError(
            f"HF config moe_shared_expert_intermediate_size={shared}; transformers then builds a shared expert "
            f"of intermediate_size, give its real width"
        )
    scaling = _optional(config, 1.0, "routed_scaling_factor")
    grouped = groups > 1
    return MoEConfig(
        num_experts=experts,
        top_k=top_k,
        ffn_hidden_size=_required(config, "moe_intermediate_size"),
        shared_ffn_hidden_size=shared,
        score_function="sigmoid",
        expert_bias=True,
        scaling_factor=None if scaling == 1.0 else scaling,
        num_groups=groups if grouped else None,
        topk_groups=topk_groups if grouped else None,
        latent_size=config.get("moe_latent_size"),
    )


def hf_dtype(config: dict) -> str | None:
    """The pipeline dtype name (bf16/fp32) of an HF config's `dtype`/`torch_dtype`, None if other/absent."""
    value = config.get("dtype") or config.get("torch_dtype")
    return {v: k for k, v in DTYPE_NAMES.items()}.get(value)


def time_step_clamp(config: dict) -> float:
    """The dt clamp that transformers applies for this config (see the module docstring)."""
    return float(config.get("time_step_min", config.get("mamba_dt_min", 1e-3)))
