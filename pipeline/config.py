"""Run configuration: one dataclass per config group, composed into `RunConfig`.

The dataclasses are the schema. `register_configs()` puts them in Hydra's ConfigStore so that a
YAML file or command-line override with a misspelled key or a wrong type fails at composition,
and `to_run_config()` turns the composed DictConfig into a validated `RunConfig`. Checks that
involve one group live in that group's `__post_init__`; checks across groups in `validate_run`.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from pipeline.data.config import DataConfig
from pipeline.errors import ConfigError
from pipeline.model.config import ModelConfig
from pipeline.model.pattern import ATTENTION, MAMBA, split_stages

FP8_RECIPES = ("tensorwise", "delayed", "blockwise", "mxfp8")


@dataclass
class ParallelConfig:
    """How the model is split over processes. Data parallel size = world size / (tp * pp)."""

    tp: int = 1
    """Tensor parallel size."""
    pp: int = 1
    """Pipeline parallel size; virtual stages come from '|' segments in model.pattern."""
    sequence_parallel: bool = False
    """Shard activations along the sequence in TP regions (GPU only, needs tp > 1)."""
    distributed_optimizer: bool = True
    """Shard optimizer states over data-parallel ranks (megatron-core's distributed optimizer)."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}={getattr(self, name)} must be >= 1")


@dataclass
class PrecisionConfig:
    """Numeric formats. FP8 applies to Transformer Engine GEMMs only (GPU)."""

    name: str = "bf16"
    params_dtype: str = "bf16"
    """Compute/parameter dtype: bf16 or fp32 (the optimizer keeps fp32 master weights)."""
    fp8: Optional[str] = None
    """None, 'hybrid' (E4M3 forward, E5M2 backward) or 'e4m3'."""
    fp8_recipe: str = "tensorwise"
    """tensorwise (current scaling), delayed, blockwise or mxfp8 (Blackwell only)."""
    fp8_amax_history_len: int = 1024
    """Delayed scaling only: amax history window."""
    first_last_layers_bf16: bool = False
    """Keep the first/last layers in BF16 (the Nemotron-H recipe); not with delayed scaling."""
    num_layers_at_start_in_bf16: int = 2
    num_layers_at_end_in_bf16: int = 2

    def __post_init__(self) -> None:
        if self.params_dtype not in ("bf16", "fp32"):
            raise ConfigError(f"precision.params_dtype={self.params_dtype!r}; use bf16 or fp32")
        if self.fp8 not in (None, "hybrid", "e4m3"):
            raise ConfigError(f"precision.fp8={self.fp8!r}; use null, hybrid or e4m3")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ConfigError(
                f"precision.fp8_recipe={self.fp8_recipe!r}; use one of {', '.join(FP8_RECIPES)}"
            )
        if self.fp8 and self.first_last_layers_bf16 and self.fp8_recipe == "delayed":
            raise ConfigError(
                "precision.first_last_layers_bf16=true is not supported with "
                "precision.fp8_recipe=delayed; use fp8_recipe=tensorwise or set "
                "first_last_layers_bf16=false"
            )


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
    max_nonfinite_steps: int = 3
    """Stop the run after this many consecutive steps with a non-finite loss or gradient."""
    exit_after_steps: Optional[int] = None
    """Save and stop after this many steps of this invocation (to fit a job's time limit); the
    next start resumes. None runs to train.iters."""

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "global_batch_size", "seq_length", "iters", "max_nonfinite_steps"):
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


@dataclass
class CheckpointConfig:
    """When to save and what to keep; restarting with the same run_dir resumes from the latest."""

    save_interval: int = 100
    """Save every N steps (also at the end and on SIGTERM/SIGUSR1); 0 = only those."""
    keep_last: int = 3
    """Keep the newest K checkpoints (0 keeps all)."""
    resume: bool = True
    """Resume from run_dir/checkpoints/latest when it exists."""
    init_from: Optional[str] = None
    """Start a new run from these weights (a checkpoint, e.g. an imported HF model): weights only."""


@dataclass
class LoggingConfig:
    """Where metrics go: console always, JSONL in the run directory, W&B when enabled."""

    interval: int = 10
    """Log every N steps."""
    wandb: bool = False
    wandb_project: str = "nemotron-h"
    wandb_entity: Optional[str] = None


@dataclass
class RunConfig:
    """Everything one run needs; the root of the Hydra config tree."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run_dir: str = "runs/default"
    """Resolved config, checkpoints and logs go here; restarting with it resumes."""
    device: str = "auto"
    """auto (cuda when available), cuda or cpu."""

    def __post_init__(self) -> None:
        validate_run(self)


def validate_run(run: RunConfig) -> None:
    """Checks that involve more than one config group; each raises a one-line ConfigError."""
    m, p = run.model, run.parallel
    layers = m.parsed_pattern().layers
    tp = p.tp
    if MAMBA in layers:
        for name in ("mamba_num_heads", "mamba_num_groups"):
            if getattr(m, name) % tp:
                raise ConfigError(
                    f"model.{name}={getattr(m, name)} not divisible by parallel.tp={tp}; use a "
                    f"parallel.tp that divides {getattr(m, name)}"
                )
    if ATTENTION in layers:
        for name in ("num_attention_heads", "num_query_groups"):
            if getattr(m, name) % tp:
                raise ConfigError(
                    f"model.{name}={getattr(m, name)} not divisible by parallel.tp={tp}; use a "
                    f"parallel.tp that divides {getattr(m, name)}"
                )
    if m.padded_vocab_size % tp:
        raise ConfigError(
            f"padded vocabulary {m.padded_vocab_size} not divisible by parallel.tp={tp}; raise "
            f"model.make_vocab_size_divisible_by to a multiple of {tp}"
        )
    split_stages(m.parsed_pattern(), p.pp)
    if p.sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1; set it to false")
    if run.precision.fp8 and MAMBA in layers and m.mamba_in_proj_width % 16:
        raise ConfigError(
            f"FP8 needs the Mamba in_proj width 2*d_inner + 2*groups*state + heads = "
            f"{m.mamba_in_proj_width} to be a multiple of 16; change model.mamba_num_heads or "
            f"model.mamba_state_dim, or use precision=bf16"
        )
    if run.train.seq_length > m.seq_length:
        raise ConfigError(
            f"train.seq_length={run.train.seq_length} exceeds model.seq_length={m.seq_length}; "
            f"lower train.seq_length or raise model.seq_length"
        )
    if run.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={run.device!r}; use auto, cpu or cuda")


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (conf/config.yaml names it in its defaults)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def _reject_unknown_keys(cfg: DictConfig, schema: type, prefix: str = "") -> None:
    # Hydra's `+key=value` bypasses struct mode and to_object would silently drop the key.
    names = {f.name: f for f in dataclasses.fields(schema)}
    for key in cfg.keys():
        if key == "hydra":
            continue
        if key not in names:
            raise ConfigError(
                f"unknown config key {prefix}{key}; check the spelling (valid keys: {', '.join(names)})"
            )
        sub = names[key].type
        if dataclasses.is_dataclass(sub) and isinstance(cfg[key], DictConfig):
            _reject_unknown_keys(cfg[key], sub, f"{prefix}{key}.")


def to_run_config(cfg: DictConfig) -> RunConfig:
    """The validated RunConfig of a composed Hydra config (raises ConfigError on bad values)."""
    _reject_unknown_keys(cfg, RunConfig)
    return OmegaConf.to_object(cfg)


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def load_run_config(overrides: list[str] = ()) -> RunConfig:
    """Compose conf/config.yaml with Hydra overrides (as on the command line) into a RunConfig.

    For library callers and tests; the entry points get the same result through @hydra.main.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    return to_run_config(cfg)
