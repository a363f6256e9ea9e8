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
"""

from pipeline.errors import ConversionError
from pipeline.model.config import ModelConfig
from pipeline.model.pattern import ATTENTION, MAMBA, MLP, PIPE

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

SYMBOL_HELP = "'M' (Mamba-2), '*' (attention) and '-' (FFN)"


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
    if d_inner % model.hidden_size == 0:
        # Informational (readers use mamba_num_heads * mamba_head_dim); not integral for Nano-2 shapes.
        config["expand"] = d_inner // model.hidden_size
    return config


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
    bad = sorted({c for c in pattern if c not in (MAMBA, ATTENTION, MLP)})
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
    )


def hf_dtype(config: dict) -> str | None:
    """The pipeline dtype name (bf16/fp32) of an HF config's `dtype`/`torch_dtype`, None if other/absent."""
    value = config.get("dtype") or config.get("torch_dtype")
    return {v: k for k, v in DTYPE_NAMES.items()}.get(value)


def time_step_clamp(config: dict) -> float:
    """The dt clamp that transformers applies for this config (see the module docstring)."""
    return float(config.get("time_step_min", config.get("mamba_dt_min", 1e-3)))
