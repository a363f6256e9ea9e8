"""config.json <-> ModelConfig: what transformers reads back, what older readers need, what is refused."""

import json

import pytest

from pipeline.config import load_run_config
from pipeline.hf import ConversionError
from pipeline.hf.config import TIME_STEP_MIN, hf_config, model_config_from_hf
from pipeline.model.config import ModelConfig

SHAPE_FIELDS = (
    "pattern",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "mamba_num_heads",
    "mamba_head_dim",
    "mamba_num_groups",
    "mamba_state_dim",
    "mamba_conv_kernel",
    "mamba_chunk_size",
    "vocab_size",
    "seq_length",
    "layernorm_epsilon",
    "init_method_std",
)
# A Nano-2-like shape: Mamba inner width 128 x 80 = 10240, not 2 x 4480.
NANO2 = ["model=nemotron_nano2_9b"]


def exported(model: ModelConfig, tmp_path, dtype="bf16"):
    from transformers import AutoConfig

    (tmp_path / "config.json").write_text(json.dumps(hf_config(model, dtype, bos_token_id=1, eos_token_id=2)))
    return AutoConfig.from_pretrained(tmp_path)


def test_transformers_reads_every_size(tmp_path):
    model = load_run_config(NANO2).model
    config = exported(model, tmp_path)
    assert type(config).__name__ == "NemotronHConfig"
    assert config.hybrid_override_pattern == model.pattern
    expected = {
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "head_dim": model.kv_channels,
        "mamba_num_heads": model.mamba_num_heads,
        "mamba_head_dim": model.mamba_head_dim,
        "n_groups": model.mamba_num_groups,
        "ssm_state_size": model.mamba_state_dim,
        "conv_kernel": model.mamba_conv_kernel,
        "chunk_size": model.mamba_chunk_size,
        "vocab_size": model.vocab_size,
        "layer_norm_epsilon": model.layernorm_epsilon,
        "mlp_hidden_act": "relu2",
        "residual_in_fp32": False,
        "tie_word_embeddings": False,
        "time_step_min": TIME_STEP_MIN,
        "num_hidden_layers": len(model.pattern),
        "eos_token_id": 2,
        "bos_token_id": 1,
    }
    wrong = {k: (getattr(config, k), v) for k, v in expected.items() if getattr(config, k) != v}
    assert not wrong, f"transformers read (got, expected): {wrong}"


def test_fields_the_older_remote_code_reader_needs(tmp_path):
    # NVIDIA's configuration_nemotron_h.py asserts len(pattern) == num_hidden_layers and its
    # attention reads attention_head_dim; its mixers take the attribute names below.
    model = load_run_config(["model.pattern=M-|M*-"]).model
    config = hf_config(model, "bf16")
    assert config["hybrid_override_pattern"] == "M-M*-", "pipeline segment separators must be dropped"
    assert config["num_hidden_layers"] == 5
    assert config["attention_head_dim"] == config["head_dim"] == model.kv_channels
    for key in (
        "n_groups",
        "conv_kernel",
        "chunk_size",
        "ssm_state_size",
        "mamba_num_heads",
        "mamba_head_dim",
        "use_conv_bias",
        "mamba_proj_bias",
        "time_step_min",
        "layer_norm_epsilon",
        "architectures",
    ):
        assert key in config, f"{key} missing"
    assert "time_step_limit" not in config, "Infinity is not JSON; both readers default the limit to (0, inf)"
    json.loads(json.dumps(config, allow_nan=False))


def test_exported_dtype_is_named_both_ways(tmp_path):
    model = load_run_config([]).model
    assert str(exported(model, tmp_path, "fp32").dtype) == "torch.float32"
    assert hf_config(model, "fp32")["torch_dtype"] == "float32"
    assert hf_config(model, "bf16")["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "overrides", [[], NANO2, ["model=nemotron_h_8b"], ["model.pattern=M-M-"], ["model.pattern=*-*-"]]
)
def test_model_config_survives_hf_config(overrides):
    model = load_run_config(overrides).model
    back = model_config_from_hf(hf_config(model, "bf16"), model.name)
    layers = model.parsed_pattern().layers
    fields = [f for f in SHAPE_FIELDS if not (f.startswith("mamba_") and "M" not in layers)]
    fields = [
        f for f in fields if not (f in ("num_attention_heads", "num_query_groups", "kv_channels") and "*" not in layers)
    ]
    diff = {f: (getattr(model, f), getattr(back, f)) for f in fields if getattr(model, f) != getattr(back, f)}
    assert diff == {} or diff == {"pattern": (model.pattern, layers)}, diff


def test_new_style_layers_block_type_is_read():
    config = hf_config(load_run_config([]).model, "bf16")
    pattern = config.pop("hybrid_override_pattern")
    names = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}
    config["layers_block_type"] = [names[c] for c in pattern]
    assert model_config_from_hf(config, "x").pattern == pattern


BAD_CONFIGS = {
    "other model type": ({"model_type": "llama"}, ["model_type='llama'", "nemotron_h"]),
    "gated delta net layer": ({"hybrid_override_pattern": "M*G-M-M"}, ["'G' (gated delta net)", "cannot represent"]),
    "MoE layer without its sizes": (
        {"layers_block_type": ["linear_attention", "moe"], "hybrid_override_pattern": None, "num_hidden_layers": None},
        ["num_experts_per_tok"],
    ),
    "unknown block type": (
        {"layers_block_type": ["mamba", "cross_attention"], "hybrid_override_pattern": None},
        ["cross_attention"],
    ),
    "biases": ({"use_bias": True}, ["use_bias=True"]),
    "tied embeddings": ({"tie_word_embeddings": True}, ["tie_word_embeddings=True"]),
    "gated activation": ({"mlp_hidden_act": "silu"}, ["mlp_hidden_act='silu'", "relu2"]),
    "MTP layers": ({"num_nextn_predict_layers": 1}, ["num_nextn_predict_layers=1"]),
    "layer count": ({"num_hidden_layers": 99}, ["num_hidden_layers=99"]),
    "missing size": ({"mamba_num_heads": None}, ["mamba_num_heads"]),
    "head dims disagree": ({"attention_head_dim": 64}, ["head_dim", "attention_head_dim=64"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_unrepresentable_config_is_refused_in_one_line(case):
    changes, expected = BAD_CONFIGS[case]
    config = hf_config(load_run_config([]).model, "bf16")
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    with pytest.raises(ConversionError) as info:
        model_config_from_hf(config, "x")
    message = str(info.value)
    assert "\n" not in message
    for text in expected:
        assert text in message, f"{text!r} missing from {message!r}"
