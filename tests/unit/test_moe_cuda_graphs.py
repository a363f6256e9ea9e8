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


@pytest.mark.parametrize("precision", ["fp8_tensorwise", "fp8_delayed"])
def test_graphs_under_fp8_are_refused_for_moe_models(precision):
    """Graph capture of MoE layers under FP8 failed on the GPU (TE's FP8 metadata assertion): refused
    before any work, naming the switch; dense models and BF16 MoE models keep graphs."""
    assert_refused_in_one_line(precision, ["model=tiny_moe", f"precision={precision}", "train.cuda_graphs=true"],
                               ["train.cuda_graphs=true", precision, "'E'", "train.cuda_graphs=false"])
    assert run_config("model=tiny", f"precision={precision}", "train.cuda_graphs=true").train.cuda_graphs
    assert run_config("model=tiny_moe", "train.cuda_graphs=true").train.cuda_graphs
