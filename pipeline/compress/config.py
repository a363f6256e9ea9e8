"""The `compress` config group: what to compress, to which budget, and how to distill.

Fields are grouped by the step that reads them. Paths left null default to files under
`<run_dir>/compress/` written by the earlier steps, so `python -m pipeline.compress all` needs only
`compress.parent` and a budget.
"""

from dataclasses import dataclass, field
from typing import Optional

from pipeline.errors import ConfigError

STEPS = ("importance", "search", "rank", "distill")
LR_SCALE = 0.3
"""compress.lr_scale's default; measured in docs/compression.md ("Learning rate")."""


@dataclass
class CompressConfig:
    """Compression of `parent` into a student (MiniPuzzle: importance, search, rank, distill)."""

    steps: list[str] = field(default_factory=lambda: list(STEPS))
    """Steps `python -m pipeline.compress all` runs, in this order."""
    parent: Optional[str] = None
    """The parent (teacher) checkpoint: a pipeline checkpoint directory (e.g. runs/tiny/checkpoints/latest
    or an imported HF model); its model config is read from the checkpoint."""

    # importance
    scores_file: Optional[str] = None
    """Importance scores; null = <run_dir>/compress/scores (written by `importance`, read by later steps)."""
    calibration_samples: int = 1024
    """Sequences of train.seq_length tokens from the data blend for the calibration forwards."""
    layer_calibration_samples: int = 64
    """The first this many calibration sequences also score every layer by skipping it (one extra
    forward per layer each): the loss and logit-MSE increase."""

    # search
    target_params: Optional[float] = None
    """Budget: the student's parameter count at most this (e.g. 4.5e9); null = no parameter budget."""
    target_active_params: Optional[float] = None
    """Budget for MoE parents: the student's active parameters (those one token passes through: all
    but the routed experts it is not sent to, embeddings included) at most this; null = none."""
    target_memory_gib: Optional[float] = None
    """Budget: weights + KV cache + Mamba state at memory_context x memory_batch, in GiB; null = none."""
    memory_context: int = 8192
    """Context length (tokens) at which target_memory_gib is measured."""
    memory_batch: int = 1
    """Batch size (sequences) at which target_memory_gib is measured."""
    top_k: int = 3
    """Candidates kept by `search` and ranked by `rank`."""
    layer_metric: str = "logit_mse_increase"
    """Layer score that picks which layers of a type are removed: logit_mse_increase (>= 0, zero only
    for a layer that changes nothing), loss_increase or block_influence (1 - cos(in, out))."""
    max_removed_fraction: float = 0.5
    """The search removes at most this fraction of each layer type (Mamba, FFN, attention, MoE); the
    published students removed up to 17% of Mamba, 11% of FFN and 50% of attention layers."""
    hidden_sizes: Optional[list[int]] = None
    """Hidden sizes the search tries; null = the parent's and 7/8, 3/4, 5/8, 1/2 of it."""
    ffn_hidden_sizes: Optional[list[int]] = None
    """FFN widths the search tries; null = the parent's and 7/8, 3/4, 5/8, 1/2 of it."""
    mamba_heads_per_group: Optional[list[int]] = None
    """Mamba heads per group the search tries; null = the parent's and 7/8, 3/4 of it."""
    mamba_head_dims: Optional[list[int]] = None
    """Mamba head dims the search tries; null = the parent's and 3/4 of it."""
    query_heads_per_group: Optional[list[int]] = None
    """Attention query heads per KV group the search tries; null = the parent's and 1/2 of it."""
    num_experts: Optional[list[int]] = None
    """Routed experts per MoE layer the search tries (each layer keeps its most important ones, at
    least model.moe.top_k); null = the parent's and 3/4, 1/2 of it."""
    moe_ffn_hidden_sizes: Optional[list[int]] = None
    """Routed-expert FFN widths the search tries; null = the parent's and 3/4, 1/2 of it."""
    shared_ffn_hidden_sizes: Optional[list[int]] = None
    """Shared-expert FFN widths the search tries; null = the parent's and 3/4, 1/2 of it."""

    # distillation (rank and distill)
    student: Optional[str] = None
    """Student checkpoint `distill` starts from; null = the candidate `rank` picked
    (<run_dir>/compress/best.json)."""
    temperature: float = 1.0
    """Softmax temperature of the forward KL; the KL is multiplied by temperature**2 so that its
    gradient scale does not depend on it."""
    kl_weight: float = 1.0
    """Weight of KL(teacher || student) on the logits."""
    lm_weight: float = 0.0
    """Weight of the student's next-token cross-entropy (0 = logit-only KD, the Minitron recipe)."""
    hidden_weight: float = 0.0
    """Weight of 1 - cos(teacher, student) on the final hidden states (the final norm's output); the
    teacher's hidden is sliced to the student's kept channels when hidden was pruned."""
    rank_iters: int = 400
    """Optimizer steps of the short distillation `rank` runs per candidate."""
    lr_scale: float = LR_SCALE
    """Distillation (`rank` and `distill`) runs optim's schedule with both rates scaled by this: peak
    lr_scale x optim.lr, decaying to lr_scale x optim.min_lr (optim.warmup_iters unchanged). optim
    holds the parent size's pretraining rates, so the student retrains at a fraction of them, as
    Minitron does (1e-4 -> 1e-5 after pretraining at 3e-4): at the full rate the first steps undo
    what pruning kept. The default comes from a sweep on the worked example (docs/compression.md)."""

    def __post_init__(self) -> None:
        for step in self.steps:
            if step not in STEPS:
                raise ConfigError(f"compress.steps has {step!r}; use steps from {', '.join(STEPS)}")
        for name in ("calibration_samples", "layer_calibration_samples", "memory_context", "memory_batch", "top_k",
                     "rank_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"compress.{name}={getattr(self, name)} must be >= 1")
        metrics = ("logit_mse_increase", "loss_increase", "block_influence")  # scores.LAYER_METRICS
        if self.layer_metric not in metrics:
            raise ConfigError(f"compress.layer_metric={self.layer_metric!r}; use one of {', '.join(metrics)}")
        if not 0 <= self.max_removed_fraction < 1:
            raise ConfigError(f"compress.max_removed_fraction={self.max_removed_fraction} must be in [0, 1)")
        for name in ("hidden_sizes", "ffn_hidden_sizes", "mamba_heads_per_group", "mamba_head_dims",
                     "query_heads_per_group", "num_experts", "moe_ffn_hidden_sizes", "shared_ffn_hidden_sizes"):
            values = getattr(self, name)
            if values is not None and (not values or min(values) < 1):
                raise ConfigError(f"compress.{name}={values} must list positive widths (or be null)")
        if not self.lr_scale > 0:
            raise ConfigError(f"compress.lr_scale={self.lr_scale} must be > 0 (distillation peaks at "
                              f"lr_scale x optim.lr; 1 = the pretraining rate)")
        if not self.temperature > 0:
            raise ConfigError(f"compress.temperature={self.temperature} must be > 0")
        weights = {n: getattr(self, n) for n in ("kl_weight", "lm_weight", "hidden_weight")}
        for name, value in weights.items():
            if value < 0:
                raise ConfigError(f"compress.{name}={value} must be >= 0")
        if not any(weights.values()):
            raise ConfigError("compress.kl_weight, lm_weight and hidden_weight are all 0; set kl_weight=1")
