"""Run configuration: the config groups' dataclasses, composed into `RunConfig`.

Each group's schema lives beside its owner (`model.config`, `distributed.ParallelConfig`,
`model.precision`, `training.config`, `checkpoint`, `data.config`, `metrics`); this module only
composes them. The dataclasses are the schema. `register_configs()` puts them in Hydra's
ConfigStore so that a YAML file or command-line override with a misspelled key or a wrong type
fails at composition, and `to_run_config()` turns the composed DictConfig into a validated
`RunConfig`. Checks that
involve one group live in that group's `__post_init__`; checks across groups in `validate_run`.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.checkpoint import CheckpointConfig
from pipeline.compress.config import CompressConfig
from pipeline.data.config import DataConfig
from pipeline.distributed import ParallelConfig
from pipeline.errors import ConfigError
from pipeline.metrics import LoggingConfig
from pipeline.model.config import ModelConfig
from pipeline.model.pattern import ATTENTION, MAMBA, MOE, split_stages
from pipeline.model.precision import PrecisionConfig
from pipeline.training.config import OptimConfig, TrainConfig, validate_recompute


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
    compress: CompressConfig = field(default_factory=CompressConfig)
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
    split_by_tp = {
        MAMBA: ("mamba_num_heads", "mamba_num_groups"),
        ATTENTION: ("num_attention_heads", "num_query_groups"),
    }
    for name in (name for kind, names in split_by_tp.items() if kind in layers for name in names):
        if getattr(m, name) % tp:
            raise ConfigError(
                f"model.{name}={getattr(m, name)} not divisible by parallel.tp={tp}; use a "
                f"parallel.tp that divides {getattr(m, name)}"
            )
    _validate_experts(m, p)
    _validate_context_parallel(run)
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
    _validate_graphed_bf16_experts(run, layers)
    if p.fp8_param_gather and not run.precision.fp8:
        raise ConfigError(f"parallel.fp8_param_gather=true needs an FP8 precision (precision={run.precision.name}); "
                          f"use precision=fp8_tensorwise or set parallel.fp8_param_gather=false")
    if p.grad_reduce_dtype == "bf16" and run.precision.params_dtype != "bf16":
        raise ConfigError(f"parallel.grad_reduce_dtype=bf16 needs precision.params_dtype=bf16 (gradients are "
                          f"{run.precision.params_dtype} here); set parallel.grad_reduce_dtype=fp32")
    if run.train.seq_length > m.seq_length:
        raise ConfigError(
            f"train.seq_length={run.train.seq_length} exceeds model.seq_length={m.seq_length}; "
            f"lower train.seq_length or raise model.seq_length"
        )
    _validate_phases(run)
    chunks = [len(stage.symbols) for rank in split_stages(m.parsed_pattern(), p.pp) for stage in rank]
    validate_recompute(run.train, layers, chunks, MOE in layers and m.moe.shared_ffn_hidden_size > 0,
                       run.precision.fp8_recipe if run.precision.fp8 else None)
    if run.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={run.device!r}; use auto, cpu or cuda")


def _validate_context_parallel(run: RunConfig) -> None:
    """parallel.cp against the Mamba heads and groups (megatron-core's MambaContextParallel), the
    sequence length and the options that need fixed sequence shapes."""
    m, p, cp = run.model, run.parallel, run.parallel.cp
    if cp == 1:
        return
    layers = m.parsed_pattern().layers
    if MAMBA in layers:
        heads, groups = m.mamba_num_heads // p.tp, m.mamba_num_groups // p.tp
        if heads % cp:
            raise ConfigError(f"model.mamba_num_heads={m.mamba_num_heads} not divisible by parallel.tp*parallel.cp="
                              f"{p.tp * cp}; use a parallel.cp that divides {heads}")
        if groups % cp and cp % groups:
            raise ConfigError(f"parallel.cp={cp} must divide or be a multiple of the {groups} Mamba groups per "
                              f"tensor-parallel rank (model.mamba_num_groups={m.mamba_num_groups})")
    if run.train.seq_length % (2 * cp):
        raise ConfigError(f"train.seq_length={run.train.seq_length} not divisible by 2*parallel.cp={2 * cp} (each "
                          f"rank holds two of 2*cp chunks); use a multiple of {2 * cp}")
    if run.train.cuda_graphs:
        raise ConfigError("parallel.cp > 1 with train.cuda_graphs=true: graphs replay fixed shapes and context "
                          "parallelism pads packed documents; set train.cuda_graphs=false")
    if run.train.packed_documents and p.pp > 1:
        raise ConfigError(f"parallel.cp={cp} with packed documents needs parallel.pp=1 (documents are padded to "
                          f"multiples of 2*cp, so the sequence length varies); set parallel.pp=1 or "
                          f"train.packed_documents=false")


def _validate_phases(run: RunConfig) -> None:
    """data.phases against the run's length, the model's sequence length, the lr schedule and the options
    that fix one sequence length."""
    phases = run.data.phases
    if not phases:
        return
    last = len(phases) - 1
    if phases[last].start_step >= run.train.iters:
        raise ConfigError(
            f"data.phases[{last}].start_step={phases[last].start_step} is not before train.iters="
            f"{run.train.iters}; the phase would never run: raise train.iters or remove the phase"
        )
    for i, phase in enumerate(phases):
        if phase.seq_length is not None and phase.seq_length > run.model.seq_length:
            raise ConfigError(
                f"data.phases[{i}].seq_length={phase.seq_length} exceeds model.seq_length={run.model.seq_length}; "
                f"raise model.seq_length or lower the phase's seq_length"
            )
        if phase.lr_decay and run.optim.schedule != "wsd":
            raise ConfigError(f"data.phases[{i}].lr_decay=true needs optim.schedule=wsd (it is "
                              f"{run.optim.schedule}); set optim.schedule=wsd or lr_decay=false")
        if phase.lr_decay and run.optim.wsd_decay_iters:
            raise ConfigError(f"data.phases[{i}].lr_decay=true sets WSD's decay length itself; remove "
                              f"optim.wsd_decay_iters={run.optim.wsd_decay_iters}")
        cp = run.parallel.cp
        if phase.seq_length is not None and cp > 1 and phase.seq_length % (2 * cp):
            raise ConfigError(f"data.phases[{i}].seq_length={phase.seq_length} not divisible by "
                              f"2*parallel.cp={2 * cp}; use a multiple of {2 * cp}")
        fixed = [name for name, on in (("train.cuda_graphs", run.train.cuda_graphs),
                                       ("parallel.tp_comm_overlap", run.parallel.tp_comm_overlap)) if on]
        if phase.seq_length not in (None, run.train.seq_length) and fixed:
            raise ConfigError(
                f"data.phases[{i}].seq_length={phase.seq_length} differs from train.seq_length="
                f"{run.train.seq_length}, but {fixed[0]}=true fixes the shapes to one length; train the phase "
                f"in its own run (checkpoint.init_from) or set {fixed[0]}=false"
            )


def _validate_graphed_bf16_experts(run: RunConfig, layers: str) -> None:
    """train.cuda_graphs under FP8 with an `E` layer among the first/last layers kept in BF16.

    megatron-core 0.19.2 captures such a layer with the FP8 recipe active at capture time, which in a
    BF16 layer is Transformer Engine's default (DelayedScaling); TE then saves recipe state for the
    experts' te.ops that their BF16 forward does not have, and the first capture fails with "Saved
    FP8 metadata does not match operation's FP8 metadata" (bench_moe on an H100, 2026-12-06,
    docs/performance.md). Dense layers are TE modules, which that restore handles."""
    pr = run.precision
    if not (run.train.cuda_graphs and pr.fp8 and pr.first_last_layers_bf16):
        return
    kept = [i for i, kind in enumerate(layers) if kind == MOE
            and (i < pr.num_layers_at_start_in_bf16 or i >= len(layers) - pr.num_layers_at_end_in_bf16)]
    if kept:
        raise ConfigError(f"train.cuda_graphs=true with precision={pr.name} keeps MoE ('E') layer(s) {kept} in BF16 "
                          f"(precision.first_last_layers_bf16), whose graph capture fails in Transformer Engine 2.20; "
                          f"set precision.first_last_layers_bf16=false or train.cuda_graphs=false")


def _validate_experts(m: ModelConfig, p: ParallelConfig) -> None:
    """Expert parallel layout against the `E` layers' sizes."""
    if MOE not in m.parsed_pattern().layers:
        for name in ("ep", "etp"):
            if getattr(p, name) > 1:
                raise ConfigError(f"parallel.{name}={getattr(p, name)} but model.pattern has no 'E' (MoE) layer; "
                                  f"set parallel.{name}=1")
        return
    moe = m.moe
    if p.tp > 1 and not p.sequence_parallel:
        # megatron-core's MoELayer refuses to train this way (moe_layer.py: "performance may degrade").
        raise ConfigError(f"'E' (MoE) layers with parallel.tp={p.tp} need parallel.sequence_parallel=true")
    if moe.num_experts % p.ep:
        raise ConfigError(
            f"model.moe.num_experts={moe.num_experts} not divisible by parallel.ep={p.ep}; use a parallel.ep "
            f"that divides {moe.num_experts}"
        )
    if moe.ffn_hidden_size % p.etp:
        raise ConfigError(
            f"model.moe.ffn_hidden_size={moe.ffn_hidden_size} not divisible by parallel.etp={p.etp}; use a "
            f"parallel.etp that divides {moe.ffn_hidden_size}"
        )
    if moe.shared_ffn_hidden_size % p.tp:
        raise ConfigError(
            f"model.moe.shared_ffn_hidden_size={moe.shared_ffn_hidden_size} not divisible by parallel.tp={p.tp}; "
            f"use a parallel.tp that divides it"
        )


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


def load_run_config(overrides: list[str] = (), config_name: str = "config") -> RunConfig:
    """Compose conf/config.yaml with Hydra overrides (as on the command line) into a RunConfig.

    For library callers and tests; the entry points get the same result through @hydra.main.
    """
    return to_run_config(compose_config(overrides, config_name))


def compose_config(overrides: list[str] = (), config_name: str = "config") -> DictConfig:
    """conf/config.yaml with Hydra overrides, composed but not yet validated (`to_run_config`)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name=config_name, overrides=list(overrides))
