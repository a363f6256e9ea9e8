"""Parameter counts, FLOPs and memory estimates of pipeline/model/sizes.py against the published
table (docs/architecture.md), hand computations and the invariants of the parallel layouts."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.distributed import ParallelConfig
from pipeline.model import params, sizes
from pipeline.model.config import ModelConfig
from pipeline.model.precision import PrecisionConfig
from pipeline.training.config import TrainConfig

MODEL_CONF = Path(__file__).resolve().parents[2] / "conf" / "model"

# docs/architecture.md (Nemotron-H / Nemotron Nano 2 papers): params in billions, (M, -, *) layer counts.
PUBLISHED = {
    "nemotron_h_4b": (4.49, 24, 24, 4),
    "nemotron_h_8b": (8.10, 24, 24, 4),
    "nemotron_h_47b": (46.8, 45, 48, 5),
    "nemotron_h_56b": (56.3, 54, 54, 10),
    "nemotron_nano2_12b": (12.3, 28, 28, 6),
    "nemotron_nano2_9b": (8.89, 27, 25, 4),
}


def load_model(name: str, **overrides) -> ModelConfig:
    """A preset from conf/model through the ModelConfig schema (strict: unknown keys fail)."""
    preset = OmegaConf.load(MODEL_CONF / f"{name}.yaml")
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), preset)
    model = OmegaConf.to_object(cfg)
    for key, value in overrides.items():
        setattr(model, key, value)
    return model


# A model small enough to count by hand (counts worked out in the comments).
HAND = dict(
    name="hand", pattern="M*-", hidden_size=16, ffn_hidden_size=32, num_attention_heads=2,
    num_query_groups=1, kv_channels=8, mamba_num_heads=4, mamba_head_dim=4, mamba_num_groups=2,
    mamba_state_dim=2, mamba_conv_kernel=4, vocab_size=100, make_vocab_size_divisible_by=128,
)
# M: norm 16 + in_proj 16*(2*16 + 2*2*2 + 4 = 44) = 704 + conv (16+8)*4 = 96 + bias 24
#    + A_log/D/dt_bias 3*4 = 12 + norm 16 + out_proj 16*16 = 256                         -> 1124
# *: norm 16 + qkv 16*(2*8 + 2*1*8) = 512 + proj 16*16 = 256                            -> 784
# -: norm 16 + fc1 16*32 = 512 + fc2 512                                                -> 1040
# vocab 100 padded to 128: embedding 128*16 = 2048, output 2048, final norm 16
HAND_COUNTS = {
    "mamba": 1124, "attention": 784, "mlp": 1040, "embedding": 2048, "output_layer": 2048,
    "final_norm": 16, "moe": 0, "total": 1124 + 784 + 1040 + 2048 + 2048 + 16,
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_parameter_count_within_half_percent(name):
    expected = PUBLISHED[name][0] * 1e9
    total = sizes.param_counts(load_model(name))["total"]
    assert abs(total - expected) / expected < 0.005, (
        f"{name}: {total:,} vs published {expected:,.0f}"
    )


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_layer_counts_per_type(name):
    _, mamba, mlp, attention = PUBLISHED[name]
    counts = load_model(name).parsed_pattern().counts()
    assert counts == {"mamba": mamba, "mlp": mlp, "attention": attention, "moe": 0}, name


@pytest.mark.parametrize(
    "name, low, high", [("bench_125m", 120e6, 130e6), ("bench_1p5b", 1.45e9, 1.55e9)]
)
def test_bench_presets_have_their_nominal_size(name, low, high):
    total = sizes.param_counts(load_model(name))["total"]
    assert low <= total <= high, f"{name} has {total:,} parameters"


def test_param_counts_match_hand_count():
    assert sizes.param_counts(ModelConfig(**HAND)) == HAND_COUNTS


def test_parameter_numels_names_and_tp_shards():
    model = ModelConfig(**HAND)
    full, half = params.parameter_numels(model, tp=1), params.parameter_numels(model, tp=2)
    # Megatron-core TE-spec names (docs/checkpoints.md; conv as named_parameters() lists it in 0.19).
    assert set(full) == {
        "embedding.word_embeddings.weight", "decoder.final_norm.weight", "output_layer.weight",
        *(f"decoder.layers.0.mixer.{n}" for n in (
            "in_proj.layer_norm_weight", "in_proj.weight", "conv1d_weight", "conv1d_bias",
            "A_log", "D", "dt_bias", "norm.weight", "out_proj.weight")),
        "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.1.self_attention.linear_qkv.weight",
        "decoder.layers.1.self_attention.linear_proj.weight",
        "decoder.layers.2.mlp.linear_fc1.layer_norm_weight",
        "decoder.layers.2.mlp.linear_fc1.weight", "decoder.layers.2.mlp.linear_fc2.weight",
    }
    assert sum(full.values()) == HAND_COUNTS["total"]
    for name, numel in full.items():
        replicated = name.endswith(("layer_norm_weight", "final_norm.weight"))
        assert half[name] == (numel if replicated else numel // 2), name


def hand_flops_per_token(m: ModelConfig, L: int, d_in: int, counts: dict) -> float:
    """docs/performance.md's formula written out directly, with T = 1 token and S2 = L (full-length sequences)."""
    h, V, n, g = m.hidden_size, m.padded_vocab_size, m.num_attention_heads, m.num_query_groups
    p = m.kv_channels * n / h
    G, N, H = m.mamba_num_groups, m.mamba_state_dim, m.mamba_num_heads
    att = 4 * h * p * (h + h * g / n) + 2 * L * h * p
    mlp = 4 * h * m.ffn_hidden_size
    mamba = 2 * h * (2 * d_in + 2 * G * N + H) + 7 * d_in * N + 2 * d_in * h
    layers = counts["attention"] * att + counts["mlp"] * mlp + counts["mamba"] * mamba
    return 3 * (layers + 2 * h * V)


def test_flops_per_token_matches_hand_computation():
    m = ModelConfig(**HAND)
    expected = hand_flops_per_token(m, 64, d_in=16, counts={"attention": 1, "mlp": 1, "mamba": 1})
    assert sizes.flops_per_token(m, 64) == pytest.approx(expected, rel=1e-12)


def test_flops_per_step_is_per_token_times_tokens():
    m = ModelConfig(**HAND)
    assert sizes.flops_per_step(m, 64, 8) == pytest.approx(sizes.flops_per_token(m, 64) * 64 * 8)


def test_nano2_9b_flops_use_heads_times_head_dim():
    m = load_model("nemotron_nano2_9b")
    counts = m.parsed_pattern().counts()
    got = sizes.flops_per_token(m, 8192)
    assert got == pytest.approx(hand_flops_per_token(m, 8192, 128 * 80, counts), rel=1e-12)
    assert got != pytest.approx(hand_flops_per_token(m, 8192, 2 * 4480, counts), rel=1e-3)


TRAIN = TrainConfig(micro_batch_size=1, global_batch_size=64, seq_length=4096)


def estimate(model, dp=1, **parallel):
    return sizes.memory_estimate(model, ParallelConfig(**parallel), TRAIN, PrecisionConfig(), dp)


def test_distributed_optimizer_divides_optimizer_state_by_dp():
    m = load_model("nemotron_h_8b")
    one, four = estimate(m, dp=1), estimate(m, dp=4)
    assert four.optimizer == one.optimizer // 4
    assert estimate(m, dp=4, distributed_optimizer=False).optimizer == one.optimizer


def test_tp_halves_sharded_weights_and_keeps_norms():
    m = load_model("nemotron_h_8b")
    total = sizes.param_counts(m)["total"]
    norms = m.hidden_size * (len(m.parsed_pattern().layers) + 1)  # one pre-norm per layer + final norm
    assert estimate(m, tp=2).weights == 2 * ((total - norms) // 2 + norms)  # bf16


def test_pipeline_stages_share_parameters_and_first_stage_is_largest():
    m = load_model("nemotron_h_8b")
    assert sum(sizes.stage_param_counts(m, tp=1, pp=4)) == sizes.param_counts(m)["total"]
    stages = sizes.stage_memory_estimates(m, ParallelConfig(pp=4), TRAIN, PrecisionConfig(), dp=1)
    assert estimate(m, pp=4).pp_rank == 0
    assert all(stages[0].total > s.total for s in stages[1:]), [s.total for s in stages]


def test_8b_weights_grads_optimizer_are_16_to_18_bytes_per_param():
    m = load_model("nemotron_h_8b")
    e = estimate(m)
    per_param = (e.weights + e.grads + e.optimizer) / sizes.param_counts(m)["total"]
    assert 16 <= per_param <= 18, per_param


def test_sequence_parallel_shrinks_activations():
    m = load_model("nemotron_h_8b")
    assert estimate(m, tp=2, sequence_parallel=True).activations < estimate(m, tp=2).activations


# Nemotron 3 Nano 30B-A3B (issue 24; HF model card / Nemotron 3 report): 31.6B total; 3.2B active per token without
# the input embedding, 3.6B with it. The output layer (352M) is counted as active in both: it is a GEMM every token
# runs (active minus both embedding matrices would be 2.88B). The active figures are given to two significant digits,
# so they are checked to their rounding (+-0.05B, up to 1.6%); the total to 0.5%.
def test_nemotron3_nano_total_and_active_parameters_match_published():
    m = load_model("nemotron3_nano_30b_a3b")
    counts = sizes.param_counts(m)
    assert abs(counts["total"] - 31.6e9) / 31.6e9 < 0.005, counts["total"]
    active = sizes.active_param_count(m)
    assert abs(active - 3.6e9) < 0.05e9, active
    assert abs(active - counts["embedding"] - 3.2e9) < 0.05e9, active - counts["embedding"]
    assert m.parsed_pattern().counts() == {"mamba": 23, "moe": 23, "attention": 6, "mlp": 0}


# An MoE model small enough to count by hand: h 16, 4 experts (top-2) of FFN 8, a shared expert of 12.
HAND_MOE = dict(HAND, name="hand_moe", pattern="E", moe=dict(num_experts=4, top_k=2, ffn_hidden_size=8,
                                                            shared_ffn_hidden_size=12, score_function="sigmoid"))
# E: pre-MLP norm 16 + router 4*16 = 64 + experts 4 * (fc1 8*16 + fc2 16*8 = 256) = 1024
#    + shared expert 12*16 + 16*12 = 384                                                    -> 1488
# active: the same with 2 of the 4 experts: 1488 - 2*256 = 976; plus embedding, output, final norm 4112
# forward FLOPs per token: router 2*16*4 = 128 + experts 2 * 4*16*8 = 1024 + shared 4*16*12 = 768 -> 1920,
# output layer 2*16*128 = 4096; training = 3x
def test_moe_counts_and_flops_match_hand_count():
    m = ModelConfig(**HAND_MOE)
    counts = sizes.param_counts(m)
    assert counts["moe"] == 1488 and counts["total"] == 1488 + 4112
    assert params.routed_expert_param_count(m) == 256
    assert sizes.active_param_count(m) == 976 + 4112
    assert sizes.flops_per_token(m, 64) == 3 * (1920 + 4096)


def test_expert_parallel_divides_routed_experts_and_their_optimizer_state():
    m = load_model("nemotron3_nano_30b_a3b")
    routed = 23 * 128 * params.routed_expert_param_count(m)
    total = sizes.param_counts(m)["total"]
    one, eight = estimate(m, dp=8), estimate(m, dp=8, ep=8)
    assert one.params == total and eight.params == total - routed + routed // 8
    # Dense parameters' Adam state is sharded over dp=8; the experts' over expert dp = tp*dp/(etp*ep).
    adam = 12
    assert one.optimizer == (total - routed) * adam // 8 + routed * adam // 8
    assert eight.optimizer == (total - routed) * adam // 8 + routed // 8 * adam
    assert estimate(m, dp=8, ep=4, etp=2).params == total - routed + routed // 8


def test_moe_params_table_per_expert_parameters():
    m = load_model("tiny_moe")
    full, ep2 = params.parameter_numels(m), params.parameter_numels(m, ep=2, etp=2)
    fc1 = "decoder.layers.1.mlp.experts.linear_fc1.weight"
    assert [k for k in full if k.startswith(fc1)] == [f"{fc1}{i}" for i in range(8)]
    assert [k for k in ep2 if k.startswith(fc1)] == [f"{fc1}{i}" for i in range(4)]
    assert ep2[f"{fc1}0"] == full[f"{fc1}0"] // 2 == 64 * 128 // 2
    assert params.checkpoint_shapes(m)["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"] == (8, 64, 128)
    assert params.param_keys(f"{fc1}5") == ["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"]


# Peak memory (torch.cuda.max_memory_allocated, GiB) of bench_1p5b training steps on one H100 80GB,
# BF16, micro-batch 1, fused cross entropy: `python bench/recompute.py --presets bench_1p5b --lengths
# 16384,32768,65536 --global-batch 2 --steps 4`, 2026-12-06 (docs/performance.md "Activation recompute").
MEASURED_PEAKS = {("none", 16384): 55.7, ("selective", 16384): 47.4, ("selective", 32768): 69.5,
                  ("full", 16384): 35.5, ("full", 32768): 45.6, ("full", 65536): 65.9}


@pytest.mark.parametrize("choice,seq", sorted(MEASURED_PEAKS))
def test_memory_estimate_matches_measured_peaks_with_fused_cross_entropy(choice, seq):
    from pipeline.config import load_run_config

    run = load_run_config(["model=bench_1p5b", "device=cpu", f"train.recompute={choice}", f"train.seq_length={seq}",
                           f"model.seq_length={seq}", "train.micro_batch_size=1", "train.global_batch_size=2",
                           "train.fused_cross_entropy=true"])
    estimated = sizes.memory_estimate(run.model, run.parallel, run.train, run.precision, 1).total / 2**30
    measured = MEASURED_PEAKS[(choice, seq)]
    assert abs(estimated - measured) <= 0.06 * measured, f"estimated {estimated:.1f} GiB, measured {measured} GiB"
