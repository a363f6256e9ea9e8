"""The `train` and `optim` config groups: batch sizes, run length, seed; AdamW and its schedule."""

from dataclasses import dataclass
from typing import Optional

from pipeline.errors import ConfigError


@dataclass
class TrainConfig:
    """Batch sizes, length of the run and the random seed."""

    seed: int = 1234
    micro_batch_size: int = 2
    """Sequences per forward/backward on one data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks (the rest is accumulation)."""
    seq_length: int = 256
    """Tokens per training sequence (<= model.seq_length)."""
    iters: int = 200
    """Optimizer steps."""
    eval_interval: int = 50
    """Validation every N steps (and at the end); 0 disables it."""
    eval_iters: int = 16
    """Validation global batches, always the same ones so the curve is comparable. The loss averages
    eval_iters x global_batch_size windows (128 on the dev run: 4 gave 32, a standard error of ~0.1
    nats); the validation record states the windows and tokens it used."""
    packed_documents: bool = True
    """Reset Mamba state and attention at document boundaries (EOD) inside packed sequences;
    false = plain concatenation, state flows across documents."""
    cuda_graphs: bool = False
    """GPU: capture each Mamba, attention and FFN layer's forward and backward as CUDA graphs after
    the first step and replay them (megatron-core's per-layer graphs), which removes the CPU launch
    overhead that bounds small layers and FP8. Works with packed documents (shapes fixed by
    cuda_graph_documents). Off by default: graphed layers compute the same math but may differ from
    eager by bf16 rounding (tests/gpu/test_cuda_graphs.py states the bound)."""
    cuda_graph_documents: int = 64
    """With cuda_graphs and packed documents: document boundaries per sequence, fixed because a graph
    replays fixed shapes. Sequences with fewer documents are padded with empty ones; in one with more,
    the documents past this count are joined into one (counted in the train metrics as
    joined_documents; raise this if it is not 0)."""
    fused_cross_entropy: bool = False
    """GPU: the loss through Transformer Engine's fused cross-entropy kernel instead of megatron-core's
    unfused fp32 one (the same loss up to rounding; tests/gpu/test_cuda_graphs.py). Off by default
    because it changes the rounding."""
    expandable_segments: bool = True
    """GPU: PyTorch's expandable-segments CUDA allocator, which grows a segment instead of leaving
    freed blocks of one size stranded. Without it the graphed 8B-width run ran out of memory with
    19 GB reserved but unused (docs/performance.md). false leaves the allocator as PYTORCH_ALLOC_CONF
    (or PYTORCH_CUDA_ALLOC_CONF) says; the numerics are the same either way."""
    kernel_cache: Optional[str] = None
    """Directory keeping the compiled Triton kernels and the Mamba kernels' autotune choices, so a
    restart skips the autotuning of its first step (pipeline/training/kernel_cache.py). None:
    run_dir/kernel_cache. Point it at shared storage to share it between runs on the same GPU model."""
    max_nonfinite_steps: int = 3
    """Stop the run after this many consecutive steps with a non-finite loss or gradient."""
    exit_after_steps: Optional[int] = None
    """Save and stop after this many steps of this invocation (to fit a job's time limit); the
    next start resumes. None runs to train.iters."""

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "global_batch_size", "seq_length", "iters", "max_nonfinite_steps",
                     "cuda_graph_documents"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )


@dataclass
class OptimConfig:
    """AdamW through megatron-core's optimizer, with warmup then cosine or WSD decay."""

    lr: float = 3e-3
    min_lr: float = 3e-4
    schedule: str = "cosine"
    """cosine, wsd (warmup-stable-decay), linear or constant."""
    warmup_iters: int = 20
    wsd_decay_iters: int = 0
    """WSD only: length of the final decay phase (0 = 20% of train.iters)."""
    weight_decay: float = 0.1
    """Applied to matrices only: 1-D parameters (norms, A_log, D, dt_bias) are exempt."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "wsd", "linear", "constant"):
            raise ConfigError(f"optim.schedule={self.schedule!r}; use cosine, wsd, linear or constant")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr} must be in [0, optim.lr={self.lr}]")
