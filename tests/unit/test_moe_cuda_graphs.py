"""What `train.cuda_graphs` captures in models with `E` layers: megatron-core cannot graph a dropless
MoE layer's experts (data-dependent shapes), so only the static parts are captured, and the list
must pass megatron-core's own TransformerConfig checks."""

import pytest
import torch

from pipeline.config import load_run_config
from pipeline.model.build import graphed_modules, transformer_config
from tests.unit.config_errors import assert_refused_in_one_line


def run_config(*overrides: str):
    return load_run_config(["device=cpu", "precision=bf16", *overrides])


def test_dense_models_graph_whole_layers():
    run = run_config("model=tiny")
    assert graphed_modules(run.model) == []


def test_moe_models_graph_mixers_router_and_preprocessing():
    run = run_config("model=bench_moe")
    modules = graphed_modules(run.model)
    assert modules == ["mamba", "attn", "moe_router", "moe_preprocess"]
    config = transformer_config(run.model, run.parallel, run.precision, torch.device("cpu"), None, cuda_graphs=True)
    assert [m.name for m in config.cuda_graph_modules] == modules


def test_dense_ffn_layers_beside_moe_layers_stay_eager():
    run = run_config("model=tiny_moe", "model.pattern=M-E*")
    modules = graphed_modules(run.model)
    assert modules == ["mamba", "attn", "moe_router", "moe_preprocess"]
    transformer_config(run.model, run.parallel, run.precision, torch.device("cpu"), None, cuda_graphs=True)


def test_a_capacity_factor_leaves_the_preprocessing_that_syncs_with_the_host_uncaptured():
    run = run_config("model=bench_moe", "model.moe.capacity_factor=1.25")
    assert graphed_modules(run.model) == ["mamba", "attn", "moe_router"]


def test_graphs_refuse_moe_layers_kept_in_bf16_under_fp8():
    """An `E` layer among the first/last layers that FP8 keeps in BF16 failed its graph capture on the
    GPU (TE's FP8 metadata assertion): refused before any work, naming the layers and both ways out."""
    graphed_fp8 = ["model=bench_moe", "precision=fp8_tensorwise", "train.cuda_graphs=true"]
    assert_refused_in_one_line("E at 1 in BF16", graphed_fp8,
                               ["train.cuda_graphs=true", "[1]", "precision.first_last_layers_bf16=false"])
    assert_refused_in_one_line("E last in BF16", [*graphed_fp8, "model.pattern=MMM*MME"], ["[6]"])


@pytest.mark.parametrize("overrides", [
    ["precision=fp8_tensorwise", "precision.first_last_layers_bf16=false"],  # every layer in FP8
    ["precision=fp8_tensorwise", "model.pattern=MM*EMM*"],                     # E only in the FP8 middle
    ["precision=fp8_delayed"],                                                 # delayed keeps no layer in BF16
    ["precision=bf16"],
])
def test_graphs_stay_allowed_where_no_moe_layer_is_kept_in_bf16(overrides):
    assert run_config("model=bench_moe", "train.cuda_graphs=true", *overrides).train.cuda_graphs
