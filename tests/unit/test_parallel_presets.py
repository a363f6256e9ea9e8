"""The presets of published layouts (conf/parallel/*gpu.yaml) compose with their model, divide evenly on
their GPU count and, by describe's memory estimate, fit an 80 GB H100 (the 81,559 MiB nvidia-smi reports;
the estimate leaves out the CUDA context, communication buffers and fragmentation); the overlap options are refused
in one line where the layout cannot use them."""

import dataclasses
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from pipeline.config import load_run_config
from pipeline.describe import format_report
from pipeline.errors import ConfigError
from pipeline.model import sizes

REPO = Path(__file__).resolve().parents[2]
H100_BYTES = 81_559 * 2**20
# preset -> (model, precision, GPUs of the published run)
PUBLISHED = {
    "nemotron_h_56b_256gpu": ("nemotron_h_56b", "fp8_tensorwise", 256),
    "nemotron_h_56b_64gpu": ("nemotron_h_56b", "fp8_tensorwise", 64),
    "nemotron_h_8b_8gpu": ("nemotron_h_8b", "fp8_tensorwise", 8),
    "nemotron_nano2_12b_4gpu": ("nemotron_nano2_12b", "fp8_tensorwise", 4),
    "nemotron3_nano_30b_a3b_16gpu": ("nemotron3_nano_30b_a3b", "fp8_tensorwise", 16),
}


@pytest.fixture(autouse=True)
def fresh_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def load(preset: str, *extra: str):
    model, precision, _ = PUBLISHED[preset]
    return load_run_config([f"parallel={preset}", f"model={model}", f"precision={precision}", *extra])


def test_every_layout_preset_is_listed():
    on_disk = {p.stem for p in (REPO / "conf" / "parallel").glob("*gpu.yaml")}
    assert on_disk == set(PUBLISHED)


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_layout_divides_and_fits(preset):
    run = load(preset)
    gpus = PUBLISHED[preset][2]
    model_parallel = run.parallel.tp * run.parallel.pp
    assert gpus % model_parallel == 0
    dp = gpus // model_parallel
    assert run.train.global_batch_size % (run.train.micro_batch_size * dp) == 0
    expert_model_parallel = run.parallel.ep * run.parallel.etp
    assert (dp * run.parallel.tp) % expert_model_parallel == 0
    assert run.parallel.ep == 1 or run.model.moe.num_experts % run.parallel.ep == 0
    estimate = sizes.memory_estimate(run.model, run.parallel, run.train, run.precision, dp)
    report = format_report(run, gpus, "test")
    print(f"{preset}: {estimate.total / 2**30:.1f} GiB per GPU\n{report}")
    assert estimate.total <= H100_BYTES, f"{preset}: {estimate.total / 1e9:.1f} GB per GPU"


def test_56b_global_batch_is_three_per_gpu():
    for preset in ("nemotron_h_56b_256gpu", "nemotron_h_56b_64gpu"):
        assert load(preset).train.global_batch_size == 3 * PUBLISHED[preset][2]


@pytest.mark.parametrize("overrides, fix", [
    (["parallel.overlap_param_gather=true"], "parallel.overlap_grad_reduce=true"),
    (["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true",
      "parallel.distributed_optimizer=false"], "parallel.distributed_optimizer=true"),
    (["parallel.fp8_param_gather=true", "parallel.distributed_optimizer=false"], "parallel.distributed_optimizer=true"),
    (["parallel.fp8_param_gather=true"], "precision=fp8_tensorwise"),
    (["parallel.tp_comm_overlap=true"], "parallel.tp > 1"),
    (["parallel.tp_comm_overlap=true", "parallel.tp=2"], "parallel.sequence_parallel=true"),
    (["parallel.grad_reduce_dtype=bf16", "precision=fp32"], "parallel.grad_reduce_dtype=fp32"),
    (["parallel.grad_reduce_dtype=fp16"], "use fp32 or bf16"),
    (["parallel.bucket_size=0"], "parallel.bucket_size=0"),
])
def test_overlap_option_refused_where_layout_cannot_use_it(overrides, fix):
    with pytest.raises(ConfigError, match="parallel") as error:
        load_run_config(overrides)
    assert fix in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_tp_comm_overlap_refused_on_cpu():
    import torch

    from pipeline.distributed import ParallelConfig
    from pipeline.training.prepare import check_parallel_supported

    parallel = ParallelConfig(tp=2, sequence_parallel=True, tp_comm_overlap=True)
    with pytest.raises(ConfigError, match="set parallel.tp_comm_overlap=false"):
        check_parallel_supported(parallel, torch.device("cpu"))
    check_parallel_supported(ParallelConfig(tp=2, sequence_parallel=True), torch.device("cpu"))


def test_bf16_gradient_buffers_halve_the_gradient_memory():
    run = load("nemotron_h_56b_256gpu")
    fp32 = sizes.memory_estimate(run.model, run.parallel, run.train, run.precision, 32)
    bf16 = dataclasses.replace(run.parallel, grad_reduce_dtype="bf16")
    half = sizes.memory_estimate(run.model, bf16, run.train, run.precision, 32)
    assert half.grads * 2 == fp32.grads == fp32.params * 4


def test_describe_names_the_expert_data_parallel_sharding():
    """Nemotron 3 Nano on 16 GPUs at EP8: dense optimizer state over DP16, the routed experts' over 16 / 8 = 2."""
    report = format_report(load("nemotron3_nano_30b_a3b_16gpu"), 16, "test")
    assert "sharded over dp=16; routed experts over expert dp=2" in report, report
