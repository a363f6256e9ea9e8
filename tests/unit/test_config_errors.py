"""Bad configurations fail before any process group or model exists, with one line naming the fix."""

import pytest
import torch

from pipeline.config import load_run_config
from pipeline.errors import ConfigError
from pipeline.model.build import check_moe_supported, check_precision_supported
from tests.unit.config_errors import assert_refused_in_one_line

# (overrides, substrings the one-line message must contain)
BAD_CONFIGS = {
    "unknown pattern symbol": (["model.pattern=M-X*-"], ["model.pattern", "'X'", "'M'"]),
    "pattern/num_layers mismatch": (["model.num_layers=9"], ["model.num_layers=9", "7 layers"]),
    "appended unknown key": (["+parallel.tpp=2"], ["parallel.tpp", "tp"]),
    "override without value": (["model.hidden_size"], ["model.hidden_size", "key=value"]),
    "mamba heads % tp": (
        ["model.mamba_num_heads=6", "model.mamba_num_groups=2", "parallel.tp=4"],
        ["model.mamba_num_heads=6", "parallel.tp=4"],
    ),
    "mamba groups % tp": (["model.mamba_num_groups=1", "parallel.tp=2"], ["model.mamba_num_groups=1", "parallel.tp=2"]),
    "attention heads % tp": (
        ["model.pattern=*-*-", "model.num_attention_heads=6", "model.num_query_groups=2", "parallel.tp=4"],
        ["model.num_attention_heads=6", "parallel.tp=4"],
    ),
    "kv groups % tp": (
        ["model.pattern=*-*-", "model.num_query_groups=1", "parallel.tp=2"],
        ["model.num_query_groups=1", "parallel.tp=2"],
    ),
    "mamba heads % groups": (
        ["model.mamba_num_heads=6", "model.mamba_num_groups=4"],
        ["model.mamba_num_heads=6", "model.mamba_num_groups=4"],
    ),
    "attention heads % kv groups": (
        ["model.num_attention_heads=6", "model.num_query_groups=4"],
        ["model.num_attention_heads=6", "model.num_query_groups=4"],
    ),
    "segments % pp": (["model.pattern=M-|M*|M-", "parallel.pp=2"], ["3 pipeline segments", "parallel.pp=2"]),
    "more stages than layers": (["model.pattern=M-", "parallel.pp=4"], ["parallel.pp=4"]),
    "fp8 in_proj width": (
        ["precision=fp8_tensorwise", "model.mamba_num_heads=6", "model.mamba_num_groups=2"],
        ["multiple of 16", "model.mamba_num_heads"],
    ),
    "first/last bf16 with delayed": (
        ["precision=fp8_delayed", "precision.first_last_layers_bf16=true"],
        ["first_last_layers_bf16", "delayed"],
    ),
    "sequence parallel without tp": (["parallel.sequence_parallel=true"], ["sequence_parallel", "parallel.tp"]),
    "train longer than model": (["train.seq_length=4096"], ["train.seq_length=4096", "model.seq_length"]),
    "misspelled key": (["model.hiden_size=64"], ["model.hiden_size", "hidden_size"]),
    "wrong type": (["model.hidden_size=wide"], ["model.hidden_size", "wide"]),
    "unknown preset": (["model=nemotron_h_9b"], ["model/nemotron_h_9b", "nemotron_h_8b"]),
    "unknown fp8 recipe": (
        ["precision=fp8_tensorwise", "precision.fp8_recipe=fast"],
        ["precision.fp8_recipe", "tensorwise"],
    ),
    # Mixture of experts ('E' layers, model.moe, parallel.ep/etp)
    "E without experts": (["model.pattern=ME*"], ["'E'", "model.moe.num_experts"]),
    "experts without E": (["model.moe.num_experts=4"], ["model.moe.num_experts=4", "no 'E'"]),
    "top_k > experts": (["model=tiny_moe", "model.moe.top_k=9"], ["model.moe.top_k=9", "num_experts=8"]),
    "experts % ep": (["model=tiny_moe", "parallel.ep=3"], ["model.moe.num_experts=8", "parallel.ep=3"]),
    "ep without E": (["parallel.ep=2"], ["parallel.ep=2", "no 'E'"]),
    "expert ffn % etp": (["model=tiny_moe", "parallel.etp=3"], ["model.moe.ffn_hidden_size=64", "parallel.etp=3"]),
    "moe with tp, no sequence parallel": (
        ["model=tiny_moe", "parallel.tp=2"],
        ["parallel.tp=2", "parallel.sequence_parallel=true"],
    ),
    "expert bias with softmax": (
        ["model=tiny_moe", "model.moe.score_function=softmax"],
        ["model.moe.expert_bias=true", "sigmoid"],
    ),
    "unknown score function": (
        ["model=tiny_moe", "model.moe.score_function=relu"],
        ["model.moe.score_function='relu'", "softmax, sigmoid"],
    ),
    "top-1 softmax": (
        ["model=tiny_moe", "model.moe.expert_bias=false", "model.moe.score_function=softmax", "model.moe.top_k=1"],
        ["model.moe.top_k=1", "softmax"],
    ),
    "aux coefficient without aux loss": (
        ["model=tiny_moe", "model.moe.aux_loss=none"],
        ["model.moe.aux_loss_coeff", "aux_loss=none"],
    ),
    "half of group routing": (
        ["model=tiny_moe", "model.moe.num_groups=2"],
        ["model.moe.num_groups", "model.moe.topk_groups"],
    ),
    "experts % groups": (
        ["model=tiny_moe", "model.moe.num_groups=3", "model.moe.topk_groups=1"],
        ["num_experts=8", "model.moe.num_groups=3"],
    ),
    "top_k beyond topk_groups": (
        ["model=tiny_moe", "model.moe.num_groups=8", "model.moe.topk_groups=1"],
        ["model.moe.top_k=2", "topk_groups=1"],
    ),
    "pad without capacity": (
        ["model=tiny_moe", "model.moe.pad_to_capacity=true"],
        ["model.moe.pad_to_capacity", "capacity_factor"],
    ),
    "unknown dispatcher": (
        ["model=tiny_moe", "model.moe.token_dispatcher=ring"],
        ["model.moe.token_dispatcher='ring'", "alltoall"],
    ),
    "misspelled moe key": (["model=tiny_moe", "model.moe.num_expert=4"], ["model.moe.num_expert"]),
    "distillation learning rate scale": (["compress.lr_scale=0"], ["compress.lr_scale=0", "optim.lr"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_gives_one_line_error(case):
    assert_refused_in_one_line(case, *BAD_CONFIGS[case])


def test_good_config_loads():
    run = load_run_config(["parallel.tp=2", "parallel.pp=2"])
    assert (run.parallel.tp, run.parallel.pp) == (2, 2)


def test_fp8_on_cpu_is_refused():
    run = load_run_config(["precision=fp8_tensorwise"])
    with pytest.raises(ConfigError, match="needs a GPU.*precision=bf16"):
        check_precision_supported(run.precision, torch.device("cpu"))


def test_fp8_on_gpu_without_fp8_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    run = load_run_config(["precision=fp8_tensorwise"])
    with pytest.raises(ConfigError, match="compute capability >= 8.9.*8.0"):
        check_precision_supported(run.precision, torch.device("cuda"))


def test_mxfp8_needs_blackwell(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    run = load_run_config(["precision=mxfp8"])
    with pytest.raises(ConfigError, match="Blackwell"):
        check_precision_supported(run.precision, torch.device("cuda"))


def test_vocabulary_smaller_than_tokenizer_is_refused():
    run = load_run_config([])
    with pytest.raises(ConfigError, match=r"model.vocab_size=4096 .* \(5000\)"):
        run.model.check_tokenizer(5000)


@pytest.mark.parametrize("override, expected", [
    ("model.moe.token_dispatcher=flex", "model.moe.token_dispatcher=flex"),
    ("model.moe.latent_size=64", "model.moe.latent_size"),
    ("model.moe.router_fusion=true", "model.moe.router_fusion=true needs Transformer Engine"),
])
def test_gpu_only_moe_options_are_refused_on_the_portable_backend(override, expected):
    run = load_run_config(["model=tiny_moe", override])
    with pytest.raises(ConfigError, match=expected):
        check_moe_supported(run.model, torch.device("cpu"), "portable")
    check_moe_supported(run.model, torch.device("cuda"), "te")
