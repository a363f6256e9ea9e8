"""Measured one-GPU throughput that the scaling model (`pipeline/model/scaling.py`) is calibrated by.

Each row is a step we timed ourselves, with where it is written down. The scaling model turns a row into
an achieved rate for the transformer-engine GEMM layers (FP8 or BF16) after taking out the output layer,
which runs in BF16 whatever the precision (docs/performance.md, FP8).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Measurement:
    """One timed training step of `model` on one GPU (sequence 8192, micro-batch 1)."""

    gpu: str
    model: str
    """A conf/model preset."""
    precision: str
    """bf16, or fp8 (tensorwise, first/last 2 layers BF16)."""
    step_s: float
    source: str


MEASUREMENTS = (
    Measurement("h100", "bench_8b_width", "bf16", 0.401,
                "docs/performance.md, 'Earlier measurements' table, 4.6B row: bare HybridModel + TE, "
                "forward and backward, H100, 2026-11-24"),
    Measurement("h100", "bench_8b_width", "fp8", 0.321,
                "the same benchmark, FP8 tensorwise with first/last 2 layers BF16"),
    Measurement("h200", "bench_8b_width", "bf16", 8192 / 22_514,
                "docs/performance.md, bench_8b_width table, 'bf16, graphs': 22,514 tokens/s, full step, "
                "H200, 2026-11-29"),
    Measurement("h200", "bench_8b_width", "fp8", 8192 / 29_073,
                "the same table, 'fp8 tensorwise (first/last 2 layers BF16), graphs': 29,073 tokens/s"),
)
"""The 8B-width rows: of what we measured, the layers closest in size to the published runs' per-GPU
shards (a 56B layer at TP8 holds half an 8B-width layer's weights per GPU)."""

MOE_MEASUREMENTS = (
    Measurement("h100", "bench_moe", "bf16", 8192 / 50_906,
                "docs/performance.md, 'Mixture of experts' table, bf16 eager: 50,906 tokens/s, full step, "
                "H100, 2026-12-06"),
    Measurement("h100", "bench_moe", "fp8", 8192 / 48_496,
                "the same table, fp8 tensorwise (first/last 2 layers BF16) eager: 48,496 tokens/s"),
)
"""The MoE rows: Nemotron 3 Nano's layer widths with 32 experts, so its grouped GEMMs see 1,536 tokens
per expert per micro-batch (the full model under EP8 gives each of a GPU's 16 experts ~3,072). The
scaling model times `E` layers at the rate these give after the other layers are taken out at the
dense rates."""


@dataclass(frozen=True)
class Links:
    """Per-GPU bandwidth, bytes/s in each direction, of the links a collective can run over."""

    nvlink: float
    infiniband: float
    gpus_per_node: int


LINKS = {
    # NVLink 4: 900 GB/s per H100/H200 counting both directions (NVIDIA data sheet), 450 GB/s each way.
    # InfiniBand NDR: one 400 Gb/s adapter per GPU on DGX H100/H200 nodes = 50 GB/s each way.
    "h100": Links(nvlink=450e9, infiniband=50e9, gpus_per_node=8),
    "h200": Links(nvlink=450e9, infiniband=50e9, gpus_per_node=8),
}
