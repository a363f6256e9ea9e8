"""The `train` and `optim` config groups: batch sizes, run length, seed; AdamW and its schedule."""

from dataclasses import dataclass
from typing import Optional

from pipeline.errors import ConfigError

RECOMPUTE = ("none", "selective", "full")
RECOMPUTE_MODULES = {
    "core_attn": "*",
    "mlp": "-",
    "moe_act": "E",
    "layernorm": "E",
    "shared_experts": "E",
    "moe": "E",
}
"""megatron-core 0.19.2's selective recompute modules for the hybrid layers, and the layer symbol each
acts in. `layernorm` is the separate norm before the MoE layer: the other layers fuse their norm
into the following linear, where megatron-core has nothing to recompute."""


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
    recompute: str = "none"
    """Activation recompute, trading compute for memory (docs/performance.md, Activation recompute):
    none keeps what every layer saves for backward; selective recomputes the parts named in
    recompute_modules; full keeps only the inputs of whole layers (recompute_method) and recomputes
    them in the backward. Same losses and gradients as none."""
    recompute_method: str = "uniform"
    """full: uniform checkpoints every group of recompute_num_layers consecutive layers of a pipeline
    stage (only each group's input is kept); block recomputes the first recompute_num_layers layers
    of each stage and keeps the rest."""
    recompute_num_layers: int = 1
    """full: layers per group (uniform) or layers recomputed per stage (block)."""
    recompute_modules: Optional[list[str]] = None
    """selective: megatron-core's recompute modules, among core_attn (attention `*`), mlp (FFN `-`),
    moe_act, layernorm, shared_experts and moe (MoE `E`). null: every one that applies to
    model.pattern except moe (the whole MoE layer): core_attn, mlp, moe_act, layernorm (and
    shared_experts with a shared expert). Mamba layers have no selective recompute in megatron-core
    0.19.2; only full recompute shrinks them."""
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
        if self.recompute not in RECOMPUTE:
            raise ConfigError(f"train.recompute={self.recompute!r}; use {', '.join(RECOMPUTE)}")
        if self.recompute_method not in ("uniform", "block"):
            raise ConfigError(f"train.recompute_method={self.recompute_method!r}; use uniform or block")
        if self.recompute_num_layers < 1:
            raise ConfigError(f"train.recompute_num_layers={self.recompute_num_layers} must be >= 1")
        unknown = sorted(set(self.recompute_modules or ()) - set(RECOMPUTE_MODULES))
        if unknown:
            raise ConfigError(f"train.recompute_modules has {', '.join(unknown)}; choose from "
                              f"{', '.join(RECOMPUTE_MODULES)}")
        if self.recompute_modules is not None and self.recompute != "selective":
            raise ConfigError(f"train.recompute_modules is for train.recompute=selective (it is "
                              f"{self.recompute}); set train.recompute=selective or train.recompute_modules=null")
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


def recompute_modules(train: TrainConfig, layers: str, shared_expert: bool) -> list[str]:
    """The selective recompute modules of `train` for a model with these layer symbols: the ones
    named, or by default every module that acts in them except `moe` (module docstring of
    `RECOMPUTE_MODULES`). Empty unless train.recompute=selective."""
    if train.recompute != "selective":
        return []
    if train.recompute_modules is not None:
        return list(train.recompute_modules)
    return [name for name, symbol in RECOMPUTE_MODULES.items()
            if symbol in layers and name != "moe" and (name != "shared_experts" or shared_expert)]


def validate_recompute(train: TrainConfig, layers: str, chunk_layers: list[int], shared_expert: bool,
                       fp8_recipe: str | None) -> None:
    """train.recompute against the model: `layers` are model.pattern's symbols, `chunk_layers` the
    number of layers of each model chunk (pipeline stage or virtual stage). One-line ConfigError."""
    if train.recompute == "full":
        if train.cuda_graphs:
            raise ConfigError("train.recompute=full with train.cuda_graphs=true: megatron-core 0.19.2 recomputes whole "
                              "layers only under whole-iteration graphs; use train.recompute=selective or "
                              "train.cuda_graphs=false")
        if train.recompute_num_layers > max(chunk_layers):
            most = max(chunk_layers)
            raise ConfigError(f"train.recompute_num_layers={train.recompute_num_layers} exceeds the {most} layers "
                              f"of a pipeline stage; use at most {most}")
        return
    if train.recompute != "selective":
        return
    modules = recompute_modules(train, layers, shared_expert)
    if not modules:
        raise ConfigError(f"train.recompute=selective has nothing to recompute in layers {layers!r} (Mamba layers "
                          f"have no selective recompute in megatron-core); use train.recompute=full")
    for name in modules:
        symbol = RECOMPUTE_MODULES[name]
        if symbol not in layers:
            raise ConfigError(f"train.recompute_modules has {name}, which acts in {symbol!r} layers, and "
                              f"model.pattern has none; remove {name}")
        if name == "shared_experts" and not shared_expert:
            raise ConfigError("train.recompute_modules has shared_experts and model.moe.shared_ffn_hidden_size=0 "
                              "(no shared expert); remove shared_experts")
        if name in ("moe_act", "layernorm") and fp8_recipe == "delayed":
            where = "train.recompute_modules has" if train.recompute_modules is not None else \
                "train.recompute=selective (its default modules) includes"
            raise ConfigError(f"{where} {name}, which megatron-core cannot recompute under delayed FP8 scaling; "
                              f"list train.recompute_modules without it or use precision=fp8_tensorwise")
