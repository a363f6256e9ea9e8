"""The parameter table against what megatron-core really builds and stores (tiny and irregular models)."""

import pytest
import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import apply_factories

from pipeline.config import load_run_config
from pipeline.distributed import distributed
from pipeline.model import params
from pipeline.model.build import build_model


@pytest.mark.parametrize("overrides", [
    [],
    ["model.pattern=M*-M-*MM-", "model.mamba_num_heads=6", "model.mamba_num_groups=3"],
    ["model=tiny_moe"],
    ["model=tiny_moe", "model.pattern=E-M*E", "model.moe.shared_ffn_hidden_size=0"],
])
def test_table_matches_built_model_and_its_sharded_state(overrides):
    run = load_run_config(["device=cpu", "precision=fp32", *overrides])
    with distributed(run.parallel, None, run.device) as world:
        (chunk,) = build_model(run.model, run.parallel, run.precision, run.train.seed, world.device)
        built = {n: p.numel() for n, p in chunk.named_parameters()}
        state = chunk.sharded_state_dict()
        apply_factories(state)  # Mamba's fused tensors become their stored components
        sharded = {
            v.key: tuple(v.global_shape)
            for v in nested_values(state)
            if hasattr(v, "global_shape") and not v.key.endswith("_extra_state")
        }
    # The MoE router's expert_bias is a stored buffer, not a parameter (params.py lists parameters).
    biases = {k for k in sharded if k.endswith(".mlp.router.expert_bias")}
    layers = run.model.parsed_pattern().layers
    assert biases == {f"decoder.layers.{i}.mlp.router.expert_bias" for i, s in enumerate(layers) if s == "E"}
    assert params.parameter_numels(run.model) == built
    assert params.checkpoint_shapes(run.model) == {k: v for k, v in sharded.items() if k not in biases}


def test_every_parameter_has_an_init_rule_and_components_share_it():
    for specs in params.LAYER_TENSORS.values():
        for spec in specs:
            assert spec.init in params.INIT_RULES, spec
            name = f"decoder.layers.0.{spec.param}" + ("3" if spec.per_expert else "")  # a routed expert's index
            assert params.init_rule(name) == spec.init
    with pytest.raises(ValueError, match="params.py"):
        params.init_rule("decoder.layers.0.mixer.unknown")


def test_layer_param_count_sums_the_layer_table():
    run = load_run_config(["device=cpu"])
    numels = params.parameter_numels(run.model)
    mamba = sum(v for k, v in numels.items() if k.startswith("decoder.layers.0."))
    assert params.layer_param_count(run.model, "M") == mamba
    assert torch.Size(params.checkpoint_shapes(run.model)["decoder.layers.0.mixer.in_proj.weight.dt"]) == (
        run.model.mamba_num_heads, run.model.hidden_size)


def test_param_keys_are_the_stored_pieces_of_each_parameter():
    model = load_run_config(["device=cpu"]).model
    shapes = params.checkpoint_shapes(model)
    numels = params.parameter_numels(model)
    assert params.param_keys("decoder.layers.0.mixer.in_proj.weight") == [
        f"decoder.layers.0.mixer.in_proj.weight.{c}" for c in ("z", "x", "B", "C", "dt")
    ]
    for name, numel in numels.items():
        pieces = params.param_keys(name)
        assert sum(torch.Size(shapes[k]).numel() for k in pieces) == numel, name
    assert sorted(k for name in numels for k in params.param_keys(name)) == sorted(shapes)
