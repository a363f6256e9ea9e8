"""A Megatron-LM, NeMo 2 or Megatron-Bridge checkpoint: where its torch_dist files are, the model
they hold (a `ModelConfig`) and what else can be carried over.

    src = open_source(path, kind=None)      # kind detected; ConversionError naming the field it refuses
    src.model, src.ckpt_dir, src.prefix, src.iteration, src.optimizer_format
    src.optimizer_refused(parallel)         # why its optimizer state cannot come along at that layout

The three layouts (facts checked against megatron-core 0.19.2 and the NeMo 2 / Bridge writers):

- Megatron-LM (`pretrain_hybrid.py`): SAVE/latest_checkpointed_iteration.txt + SAVE/iter_%07d/ with
  `.metadata`, `__*.distcp`, `metadata.json`; the common state (`args`, iteration, optimizer param
  groups, scheduler) is a `common.pt` up to core 0.18 and an object inside the distcp files since.
  The model comes from the stored `args` Namespace, with Megatron-LM's own defaults for a flag the
  Namespace lacks (an older Megatron-LM).
- NeMo 2: CKPT/weights/ (torch_dist, every key prefixed `module.`) + CKPT/context/model.yaml
  (`config:`, megatron TransformerConfig field names).
- Megatron-Bridge: SAVE/latest_checkpointed_iteration.txt + SAVE/iter_%07d/ holding the torch_dist
  files and run_config.yaml (`model:`, TransformerConfig field names; its `_target_`s are never
  instantiated), train_state.pt.

A setting the pipeline's model cannot represent is refused in one line naming the field, before
anything is written. Every pickle is read through `pipeline.checkpoint.safe_checkpoint_loading`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import ConversionError
from pipeline.model.config import ModelConfig, MoEConfig

KINDS = ("megatron-lm", "nemo2", "bridge")
MODEL_SPACE = ("fully_reshardable", "fully_sharded_model_space")
"""Distributed-optimizer formats whose tensors are shaped like the parameters: they load at any layout."""
TRACKER = "latest_checkpointed_iteration.txt"
MAMBA_EXPAND = 2
"""megatron-core's MambaMixer: d_inner = 2 x hidden when mamba_num_heads is not given."""
MAMBA_CHUNK = 128
"""megatron-core's MambaMixer chunk size (not configurable there)."""
EMBEDDING = "embedding.word_embeddings.weight"
OPTIMIZER_KEY = re.compile(r"(chained_\d+\.)?optimizer\.")
"""An optimizer state's key (`chained_N.` before it for the Nth of several optimizers, e.g. a MoE
model's dense and expert ones, where the format keeps it)."""
BUCKETS = re.compile(r"(chained_\d+\.)?optimizer\.distributed\.")
"""A dp_reshardable optimizer bucket's key."""

# Megatron-LM's parse_args defaults (megatron-core 0.19.2) for the flags read here: what an older
# Megatron-LM's Namespace without the attribute meant.
ARGS_DEFAULTS = {
    "position_embedding_type": "learned_absolute", "add_bias_linear": True, "add_qkv_bias": False,
    "swiglu": False, "squared_relu": False, "untie_embeddings_and_output_weights": False,
    "normalization": "LayerNorm", "mamba_state_dim": 128, "mamba_head_dim": 64, "mamba_num_groups": 8,
    "mamba_num_heads": None, "group_query_attention": False, "num_query_groups": 1, "kv_channels": None,
    "ffn_hidden_size": None, "layernorm_epsilon": 1e-5, "init_method_std": 0.02,
    "make_vocab_size_divisible_by": 128, "qk_layernorm": False, "layernorm_zero_centered_gamma": False,
    "apply_residual_connection_post_layernorm": False, "mtp_num_layers": None, "num_experts": None,
    "fp16": False, "bf16": False, "fp4": None, "heterogeneous_layers_config_path": None,
    "openai_gelu": False, "quick_geglu": False, "ckpt_format": "torch_dist", "seq_length": None,
    "hybrid_layer_pattern": None, "hybrid_override_pattern": None, "multi_latent_attention": False,
    "num_layers": None, "hybrid_attention_ratio": 0.0, "hybrid_mlp_ratio": 0.0,
    "global_batch_size": None,
}
# What the pipeline's layers hard-code, as (field, value it must have, what the other value means).
REQUIRED = (
    ("position_embedding_type", "none", "position embeddings (RoPE or learned); the pipeline's models use none"),
    ("add_bias_linear", False, "biases in the linear layers; the pipeline's layers have none"),
    ("add_qkv_bias", False, "biases in the QKV projection; the pipeline's layers have none"),
    ("gated_linear_unit", False, "a gated linear unit (SwiGLU) FFN; the pipeline's FFN is up -> relu^2 -> down"),
    ("activation", "squared_relu", "another FFN activation; the pipeline's FFN uses squared ReLU"),
    ("normalization", "RMSNorm", "another normalization; the pipeline's layers use RMSNorm"),
    ("tied_embeddings", False, "tied input and output embeddings; the pipeline's are separate"),
    ("qk_layernorm", False, "QK layer norms; the pipeline's attention has none"),
    ("layernorm_zero_centered_gamma", False, "zero-centred norm weights; the pipeline's are plain"),
    ("apply_residual_connection_post_layernorm", False, "post-norm residuals; the pipeline is pre-norm"),
    ("mtp_num_layers", None, "multi-token-prediction (MTP) layers; the pipeline has none"),
    ("multi_latent_attention", False, "multi-latent attention; the pipeline's attention is GQA"),
    ("heterogeneous_layers_config_path", None, "heterogeneous layers; the pipeline's layers of a kind are alike"),
    ("fp4", None, "FP4-quantized weights; import a checkpoint with bf16 or fp32 weights"),
)
# Another name some writers give a tensor (megatron-core's ModelOpt and local specs, and hybrid models
# before core 0.8, keep each layer's pre-norm as a module of its own); mapped on load, as megatron-core's
# `sharded_state_dict_keys_map` does.
ALIASES = {
    ".mixer.in_proj.layer_norm_weight": ".norm.weight",
    ".self_attention.linear_qkv.layer_norm_weight": ".input_layernorm.weight",
    ".mlp.linear_fc1.layer_norm_weight": ".pre_mlp_layernorm.weight",
}
LAYER_NAMES = {"G": "GDN (gated delta net)", "D": "DeepSeek sparse attention", "+": "multi-latent attention",
               "/": "MTP"}
# MoEConfig field <- megatron's name (the same in Megatron-LM args and TransformerConfig), and megatron's
# default (megatron-core 0.19.2) where the source does not say.
MOE_FIELDS = {
    "top_k": ("moe_router_topk", 2),
    "ffn_hidden_size": ("moe_ffn_hidden_size", None),
    "shared_ffn_hidden_size": ("moe_shared_expert_intermediate_size", None),
    "score_function": ("moe_router_score_function", "softmax"),
    "expert_bias": ("moe_router_enable_expert_bias", False),
    "bias_update_rate": ("moe_router_bias_update_rate", 1e-3),
    "scaling_factor": ("moe_router_topk_scaling_factor", None),
    "num_groups": ("moe_router_num_groups", None),
    "topk_groups": ("moe_router_group_topk", None),
    "aux_loss": ("moe_router_load_balancing_type", "aux_loss"),
    "aux_loss_coeff": ("moe_aux_loss_coeff", 0.0),
    "router_dtype": ("moe_router_dtype", None),
    "token_dispatcher": ("moe_token_dispatcher_type", "allgather"),
    "capacity_factor": ("moe_expert_capacity_factor", None),
    "drop_policy": ("moe_token_drop_policy", "probs"),
    "pad_to_capacity": ("moe_pad_expert_input_to_capacity", False),
    "latent_size": ("moe_latent_size", None),
}
MOE_REQUIRED = (
    ("moe_shared_expert_gate", False, "a gated shared expert; the pipeline's shared expert has no gate"),
    ("moe_router_pre_softmax", False, "softmax before top-k; the pipeline's router scores after selection"),
)


@dataclass
class Source:
    """A checkpoint to import and what was read from it."""

    kind: str
    path: Path
    """The path the user gave."""
    ckpt_dir: Path
    """The torch_dist directory (`.metadata` + `__*.distcp`)."""
    iteration: int
    model: ModelConfig
    precision: str
    """bf16 or fp32: the dtype the source trained in."""
    prefix: str = ""
    """What the source puts before megatron's sharded keys (`module.` in NeMo 2)."""
    optimizer_format: str | None = None
    """The distributed optimizer's sharding type, or None if the checkpoint has no optimizer state."""
    optimizer_metadata: dict = field(default_factory=dict)
    """megatron's content-metadata flags the optimizer state was saved with (e.g. Megatron-LM's
    `chained_optim_avoid_prefix`: no `chained_N.` in the keys of a MoE model's two optimizers)."""
    training: dict = field(default_factory=dict)
    """The source's optimizer and batch settings as pipeline overrides (`optim.lr`: ...), where known."""
    tokenizer_dir: Path | None = None
    """The tokenizer files the checkpoint carries (Bridge `tokenizer/`, NeMo 2 `context/nemo_tokenizer/`)."""
    renamed: dict[str, str] = field(default_factory=dict)
    """The pipeline's sharded key -> the source's, where the source names a tensor differently (ALIASES)."""

    saved_layout: dict = field(default_factory=dict)
    """The layout the source ran at ({tp, pp, ep, vpp}; empty where unknown): a `dp_reshardable`
    optimizer state loads only at the same one."""
    ddp: dict = field(default_factory=dict)
    """The source's DDP bucket settings as `parallel.*` values (overlap_grad_reduce, bucket_size,
    grad_reduce_dtype): the buckets a `dp_reshardable` state is stored in follow from them."""

    def optimizer_refused(self, parallel) -> str | None:
        """Why the optimizer state cannot be imported at `parallel` (a ParallelConfig); None if it can.

        The model-space formats (MODEL_SPACE) load at any layout. `dp_reshardable` stores the
        distributed optimizer's buckets, whose contents follow from the layout (TP, PP, EP, virtual
        stages; the import runs at DP 1, which the format may change) and the DDP bucket settings
        (taken from the source, `ddp`); the buckets' sizes and contents are checked again on load.
        """
        fmt = self.optimizer_format
        if fmt is None:
            return "no optimizer state"
        if fmt in MODEL_SPACE:
            return None
        if fmt != "dp_reshardable":
            return f"optimizer state in the {fmt} format, which import-megatron cannot read"
        if not self.saved_layout:
            return "optimizer state in the dp_reshardable format, which loads only at its own layout (not recorded)"
        wanted = {"tp": parallel.tp, "pp": parallel.pp, "ep": 1, "vpp": 1}
        if {k: self.saved_layout.get(k) for k in wanted} == wanted:
            return None
        saved = " ".join(f"{k}={v}" for k, v in self.saved_layout.items())
        return (f"optimizer state in the dp_reshardable format, which loads only at its own layout ({saved}; "
                f"this import: tp={parallel.tp} pp={parallel.pp} ep=1 vpp=1)")

    def record(self) -> dict:
        """What meta.json records about the source."""
        return {"kind": self.kind, "path": str(self.path.resolve()), "iteration": self.iteration,
                "optimizer": self.optimizer_format}


def detect_kind(path: Path) -> str:
    """The kind of checkpoint at `path` (module docstring); ConversionError if none fits."""
    if (path / "weights").is_dir() and (path / "context").is_dir():
        return "nemo2"
    if (path.parent / "weights").is_dir() and path.name in ("weights", "context"):
        raise ConversionError(f"{path} is part of a NeMo 2 checkpoint; give its parent {path.parent}")
    root = path.parent if re.fullmatch(r"iter_\d{7}", path.name) else path
    if (root / TRACKER).is_file() or root is not path:
        iter_dir = path if root is not path else _iteration_dir(root)[1]
        return "bridge" if (iter_dir / "run_config.yaml").is_file() else "megatron-lm"
    raise ConversionError(
        f"{path} is not a Megatron-LM, NeMo 2 or Megatron-Bridge checkpoint (no {TRACKER}, iter_NNNNNNN/ or "
        f"weights/ + context/); give the save directory, or name the kind with --source-kind"
    )


def _iteration_dir(root: Path) -> tuple[int, Path]:
    """(iteration, iter_%07d dir) that the tracker of save directory `root` names."""
    tracker = root / TRACKER
    if not tracker.is_file():
        found = sorted(root.glob("iter_[0-9]*"))
        if not found:
            raise ConversionError(f"{root} has no {TRACKER} and no iter_NNNNNNN/; give a Megatron save directory")
        return int(found[-1].name[5:]), found[-1]
    text = tracker.read_text().strip()
    if text == "release":
        return 0, root / "release"
    if not text.isdigit():
        raise ConversionError(f"{tracker} holds {text[:40]!r}, not an iteration; the checkpoint is damaged")
    return int(text), root / f"iter_{int(text):07d}"


def _check_format(ckpt_dir: Path) -> None:
    """The directory holds a torch_dist checkpoint; other formats are refused naming ckpt_format."""
    if not ckpt_dir.is_dir():
        raise ConversionError(f"{ckpt_dir} does not exist; the tracker names a checkpoint that is not there")
    legacy = sorted(p.name for p in ckpt_dir.glob("mp_rank_*"))
    if legacy:
        raise ConversionError(
            f"{ckpt_dir} holds legacy per-rank files ({legacy[0]}/: ckpt_format=torch); convert it to torch_dist "
            f"with Megatron-LM (--ckpt-convert-format torch_dist) and import that"
        )
    if (ckpt_dir / "modelopt_state").exists():
        # ModelOpt saves its quantizer / distillation state beside the weights (modelopt_state/).
        raise ConversionError(f"{ckpt_dir} has modelopt_state/: a quantized (or otherwise ModelOpt-converted) "
                              f"model; import the checkpoint from before ModelOpt")
    meta = ckpt_dir / "metadata.json"
    if not meta.is_file():
        # megatron's dist_checkpointing writes metadata.json; plain torch DCP (torch_dcp, fsdp_dtensor) does not.
        raise ConversionError(
            f"{ckpt_dir} has no metadata.json: ckpt_format=fsdp_dtensor or torch_dcp (or not a checkpoint), whose "
            f"keys are not megatron's sharded keys; save it with --ckpt-format torch_dist and import that"
        )
    backend = json.loads(meta.read_text()).get("sharded_backend")
    if backend == "zarr":
        raise ConversionError(f"{meta} says ckpt_format=zarr, which megatron-core 0.19 no longer reads; convert it "
                              f"to torch_dist with an older Megatron-LM (--ckpt-convert-format torch_dist)")
    if backend != "torch_dist":
        raise ConversionError(f"{meta} says sharded_backend={backend!r}; only torch_dist checkpoints can be imported")
    if not (ckpt_dir / ".metadata").is_file():
        raise ConversionError(f"{ckpt_dir} has no .metadata; the torch_dist checkpoint is damaged")


def _alias(key: str) -> str | None:
    for ours, theirs in ALIASES.items():
        if key.endswith(ours):
            return key[: -len(ours)] + theirs
    return None


def check_weights(model: ModelConfig, shapes: dict, prefix: str, ckpt_dir: Path) -> dict[str, str]:
    """The checkpoint's model tensors are exactly those of `model`, with its shapes; a tensor the
    pipeline's model has no place for (a bias, position embeddings, ...) is refused naming it. Returns
    the keys the source names differently (ALIASES): {ours: theirs}, without the prefix."""
    from pipeline.model.params import checkpoint_shapes

    stored = {k: v[0] for k, v in shapes.items() if k.startswith(prefix) and not OPTIMIZER_KEY.match(k)}
    ours = dict(checkpoint_shapes(model))
    if model.moe.expert_bias:  # a buffer, not a parameter: saved with the weights, absent from params.py
        ours.update({f"decoder.layers.{i}.mlp.router.expert_bias": (model.moe.num_experts,)
                     for i, symbol in enumerate(model.parsed_pattern().layers) if symbol == "E"})
    renamed = {}
    for key in ours:
        alias = _alias(key)
        if prefix + key not in stored and alias and prefix + alias in stored:
            renamed[key] = alias
    expected = {prefix + renamed.get(k, k): v for k, v in ours.items()}
    unsplit = sorted(k for k in stored if k.endswith(".mixer.in_proj.weight"))
    if unsplit:
        raise ConversionError(f"{ckpt_dir} stores {unsplit[0]} unsplit (megatron-core < 0.9), which the pipeline "
                              f"cannot reshard; re-save it with a newer Megatron-LM and import that")
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise ConversionError(f"{ckpt_dir} has tensor {extra[0]} ({len(extra)} such), which the pipeline's model has "
                              f"no place for; import-megatron cannot represent it")
    for key, shape in expected.items():
        if key not in stored:
            raise ConversionError(f"{ckpt_dir} has no tensor {key}, which its config implies; the checkpoint is "
                                  f"incomplete or its config does not match it")
        if tuple(stored[key]) != tuple(shape):
            raise ConversionError(f"{ckpt_dir}: tensor {key} has shape {list(stored[key])} but its config implies "
                                  f"{list(shape)}; the checkpoint and its config disagree")
    return renamed


def tensor_shapes(ckpt_dir: Path) -> dict[str, tuple[tuple[int, ...], object]]:
    """{key: (shape, dtype)} of every tensor in the checkpoint, from `.metadata` (allow-listed unpickler)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from pipeline.checkpoint import safe_checkpoint_loading

    with safe_checkpoint_loading():
        metadata = FileSystemReader(str(ckpt_dir)).read_metadata()
    return {k: (tuple(m.size), m.properties.dtype) for k, m in metadata.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata)}


def read_common_state(ckpt_dir: Path) -> dict:
    """Megatron's common state (args, iteration, optimizer param groups, scheduler) through the
    checkpoint allow-list: a crafted pickle is refused (UnsafeCheckpointError), never run."""
    from megatron.core.dist_checkpointing import serialization

    from pipeline.checkpoint import safe_checkpoint_loading

    with safe_checkpoint_loading():
        return serialization.load_common_state_dict(str(ckpt_dir))


def _yaml(path: Path, section: str) -> dict:
    import yaml

    if not path.is_file():
        raise ConversionError(f"{path} is missing; the checkpoint has no model config to import")
    data = yaml.safe_load(path.read_text()) or {}
    config = data.get(section) if isinstance(data, dict) else None
    if not isinstance(config, dict):
        raise ConversionError(f"{path} has no `{section}:` section; the checkpoint has no model config to import")
    return config


def _target_name(value) -> str:
    """The name a config gives for a callable: `squared_relu` from 'x.squared_relu' or {_target_: ...}."""
    if isinstance(value, dict):
        value = value.get("_target_") or value.get("_call_") or ""
    return str(value).rsplit(".", 1)[-1]


def fields_from_args(args) -> dict:
    """The model fields of a Megatron-LM `args` Namespace, with Megatron-LM's defaults where absent."""
    a = {**ARGS_DEFAULTS, **vars(args)}
    if a["swiglu"]:
        activation = "swiglu"
    else:
        activation = "squared_relu" if a["squared_relu"] else ("openai_gelu" if a["openai_gelu"] else "gelu")
    return {**a, "gated_linear_unit": bool(a["swiglu"]), "activation": activation,
            "tied_embeddings": not a["untie_embeddings_and_output_weights"],
            "num_query_groups": a["num_query_groups"] if a["group_query_attention"] else a["num_attention_heads"],
            "num_moe_experts": a["num_experts"]}


def fields_from_config(config: dict, where: Path) -> dict:
    """The model fields of a NeMo 2 / Bridge model config (TransformerConfig names)."""
    required = ("hidden_size", "num_attention_heads")
    for name in required:
        if config.get(name) is None:
            raise ConversionError(f"{where} has no {name}; the model config is incomplete")
    activation = _target_name(config.get("activation_func", "gelu"))
    return {
        **config,
        "tied_embeddings": config.get("share_embeddings_and_output_weights", True),
        "activation": activation,
        "gated_linear_unit": config.get("gated_linear_unit", False),
        "position_embedding_type": config.get("position_embedding_type", "none"),
        "add_bias_linear": config.get("add_bias_linear", True),
        "normalization": config.get("normalization", "LayerNorm"),
        "num_query_groups": config.get("num_query_groups") or config["num_attention_heads"],
        "num_moe_experts": config.get("num_moe_experts"),
        "bf16": config.get("bf16", False), "fp16": config.get("fp16", False),
        "layernorm_epsilon": config.get("layernorm_epsilon", 1e-5),
        "init_method_std": config.get("init_method_std", 0.02),
        "make_vocab_size_divisible_by": config.get("make_vocab_size_divisible_by", 128),
    }


def _pattern(f: dict, where: str) -> str:
    """The layer pattern: hybrid_layer_pattern (0.17+), else hybrid_override_pattern, else the ratios."""
    pattern = f.get("hybrid_layer_pattern") or f.get("hybrid_override_pattern")
    name = "hybrid_layer_pattern" if f.get("hybrid_layer_pattern") else "hybrid_override_pattern"
    if not pattern:
        if not f.get("num_layers"):
            raise ConversionError(f"{where} has no hybrid_layer_pattern, hybrid_override_pattern or num_layers; "
                                  f"it does not describe a hybrid model")
        from megatron.core.models.hybrid.hybrid_layer_allocation import pattern_from_ratios

        pattern, name = pattern_from_ratios(f["num_layers"], f.get("hybrid_attention_ratio") or 0.0,
                                            f.get("hybrid_mlp_ratio") or 0.0), "hybrid_attention_ratio"
    for symbol, what in LAYER_NAMES.items():
        if symbol in pattern:
            raise ConversionError(f"{where}: {name}={pattern!r} has {what} layers ({symbol!r}), which "
                                  f"import-megatron cannot represent yet")
    return pattern.replace("|", "")


def model_from_fields(f: dict, padded_vocab: int, name: str, where: str) -> ModelConfig:
    """The pipeline's ModelConfig for the fields (`fields_from_args` / `fields_from_config`); the
    first setting it cannot represent is refused naming the field."""
    for key, wanted, what in REQUIRED:
        value = f.get(key, wanted)
        if value != wanted and not (wanted is None and not value) and not (wanted is False and not value):
            raise ConversionError(f"{where}: {key}={value!r} means {what}; import-megatron cannot represent it")
    if f.get("fp16"):
        raise ConversionError(f"{where}: fp16=True; the pipeline trains in bf16 or fp32 (import a bf16 or fp32 run)")
    hidden, heads = f["hidden_size"], f["num_attention_heads"]
    pattern = _pattern(f, where)
    head_dim = f.get("mamba_head_dim") or 64
    divisible = f.get("make_vocab_size_divisible_by") or 128
    return ModelConfig(
        name=name,
        pattern=pattern,
        hidden_size=hidden,
        ffn_hidden_size=f.get("ffn_hidden_size") or 4 * hidden,
        num_attention_heads=heads,
        num_query_groups=f["num_query_groups"],
        kv_channels=f.get("kv_channels") or hidden // heads,
        mamba_num_heads=f.get("mamba_num_heads") or MAMBA_EXPAND * hidden // head_dim,
        mamba_head_dim=head_dim,
        mamba_num_groups=f.get("mamba_num_groups") or 8,
        mamba_state_dim=f.get("mamba_state_dim") or 128,
        mamba_conv_kernel=4,
        mamba_chunk_size=MAMBA_CHUNK,
        # The embedding's rows as stored (padded to a multiple of 128 x TP by the source): the
        # tokenizer's vocabulary is at most that.
        vocab_size=padded_vocab,
        make_vocab_size_divisible_by=divisible if padded_vocab % divisible == 0 else padded_vocab,
        seq_length=f.get("seq_length") or 4096,
        layernorm_epsilon=f.get("layernorm_epsilon") or 1e-5,
        init_method_std=f.get("init_method_std") or 0.02,
        moe=_moe(f, where, hidden) if "E" in pattern else MoEConfig(),
    )


def _moe(f: dict, where: str, hidden: int) -> MoEConfig:
    """The MoEConfig of the `E` layers from megatron's moe_* fields (MOE_FIELDS)."""
    for key, wanted, what in MOE_REQUIRED:
        if f.get(key) not in (None, wanted):
            raise ConversionError(f"{where}: {key}={f[key]!r} means {what}; import-megatron cannot represent it")
    if not f.get("num_moe_experts"):
        raise ConversionError(f"{where}: the pattern has MoE ('E') layers but num_experts is not set")
    values = {ours: f.get(theirs, default) for ours, (theirs, default) in MOE_FIELDS.items()}
    values["ffn_hidden_size"] = values["ffn_hidden_size"] or f.get("ffn_hidden_size") or 4 * hidden
    values["shared_ffn_hidden_size"] = values["shared_ffn_hidden_size"] or 0
    values["router_dtype"] = values["router_dtype"] or "model"
    return MoEConfig(num_experts=f["num_moe_experts"], **values)


# Megatron-LM args -> the pipeline override that continues the same optimisation.
TRAINING_ARGS = {"lr": "optim.lr", "min_lr": "optim.min_lr", "adam_beta1": "optim.beta1", "adam_beta2": "optim.beta2",
                 "adam_eps": "optim.eps", "weight_decay": "optim.weight_decay", "clip_grad": "optim.clip_grad",
                 "global_batch_size": "train.global_batch_size", "train_iters": "train.iters"}


def _optimizer_format(common: dict) -> str | None:
    """The distributed optimizer's sharding type (None: no optimizer state), by megatron.training's
    rule (load_checkpoint): the type stored with the state, else the content metadata (core 0.13+),
    else, for an older Megatron-LM, `fully_sharded_model_space` if it saved with
    --ckpt-fully-parallel-save and `dp_zero_gather_scatter` if not."""
    optimizer = common.get("optimizer")
    if not isinstance(optimizer, dict):
        return None
    found = (common.get("content_metadata") or {}).get("distrib_optim_sharding_type")
    args = common.get("args")
    if found is None and getattr(args, "use_distributed_optimizer", False):
        found = "fully_sharded_model_space" if getattr(args, "ckpt_fully_parallel_save", False) else \
            "dp_zero_gather_scatter"
    return optimizer.get("param_state_sharding_type") or found or "unknown"


def _saved_layout(a: dict) -> tuple[dict, dict]:
    """(saved_layout, ddp) of a run (Source fields) from its Megatron-LM args (`vars(args)`); empty
    if they do not say."""
    if not a:
        return {}, {}
    layout = {"tp": a.get("tensor_model_parallel_size") or 1, "pp": a.get("pipeline_model_parallel_size") or 1,
              "ep": a.get("expert_model_parallel_size") or 1, "vpp": a.get("virtual_pipeline_model_parallel_size") or 1}
    overlap = bool(a.get("overlap_grad_reduce", False))
    # megatron's DDP: the bucket size given, else max(40M, 1M x DP); one bucket without overlap.
    bucket = (a.get("ddp_bucket_size") or max(40_000_000, 1_000_000 * (a.get("data_parallel_size") or 1))) \
        if overlap else None
    fp32_grads = a.get("accumulate_allreduce_grads_in_fp32", False) or not (a.get("bf16") or a.get("fp16"))
    return layout, {"overlap_grad_reduce": overlap, "bucket_size": bucket,
                    "grad_reduce_dtype": "fp32" if fp32_grads else "bf16"}


def _bridge_args(run_config: Path) -> dict:
    """Megatron-LM's names for a Bridge run's layout and DDP settings (run_config.yaml `model:` and
    `ddp:`, TransformerConfig and DistributedDataParallelConfig names)."""
    import yaml

    data = yaml.safe_load(run_config.read_text()) or {}
    model, ddp = data.get("model") or {}, data.get("ddp") or {}
    names = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
             "virtual_pipeline_model_parallel_size", "bf16", "fp16")
    return {**{k: model.get(k) for k in names}, "overlap_grad_reduce": ddp.get("overlap_grad_reduce", False),
            "ddp_bucket_size": ddp.get("bucket_size"),
            "accumulate_allreduce_grads_in_fp32": ddp.get("grad_reduce_in_fp32", False)}


def open_source(path: str | Path, kind: str | None = None, name: str = "imported") -> Source:
    """Read the checkpoint at `path` (its kind detected unless given): everything checked, nothing written."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"source checkpoint {path} does not exist")
    kind = kind or detect_kind(path)
    if kind not in KINDS:
        raise ConversionError(f"--source-kind={kind!r}; use one of {', '.join(KINDS)}")
    if kind == "nemo2":
        ckpt_dir, prefix, config_file = path / "weights", "module.", path / "context" / "model.yaml"
        if not ckpt_dir.is_dir():
            raise ConversionError(f"{path} has no weights/: not a NeMo 2 checkpoint (--source-kind {kind})")
        # NeMo 2 names its checkpoints ...-step=N-consumed_samples=M; the weights do not record N.
        step = re.search(r"step=(\d+)", path.name)
        iteration = int(step.group(1)) if step else 0
    else:
        if re.fullmatch(r"iter_\d{7}", path.name):
            ckpt_dir, iteration = path, int(path.name[5:])
        else:
            iteration, ckpt_dir = _iteration_dir(path)
        prefix, config_file = "", ckpt_dir / "run_config.yaml"
    _check_format(ckpt_dir)
    shapes = tensor_shapes(ckpt_dir)
    common = read_common_state(ckpt_dir)
    training = {}
    if kind == "megatron-lm":
        if common.get("args") is None:
            raise ConversionError(f"{ckpt_dir} stores no args; it was not written by Megatron-LM (try --source-kind)")
        fields, where = fields_from_args(common["args"]), f"{ckpt_dir} args"
        iteration = common.get("iteration", iteration)
        training = {o: fields[a] for a, o in TRAINING_ARGS.items() if fields.get(a) is not None}
    elif kind == "bridge":
        fields, where = fields_from_config(_yaml(config_file, "model"), config_file), str(config_file)
        iteration = common.get("iteration", iteration)
    else:
        fields, where = fields_from_config(_yaml(config_file, "config"), config_file), str(config_file)
    if fields.get("ckpt_format", "torch_dist") not in ("torch_dist", None):
        raise ConversionError(f"{where}: ckpt_format={fields['ckpt_format']!r}; only torch_dist can be imported")
    embedding = prefix + EMBEDDING
    if embedding not in shapes:
        raise ConversionError(f"{ckpt_dir} has no tensor {embedding}; not a Megatron GPT/hybrid checkpoint "
                              f"(or a NeMo 2 one given as --source-kind={kind})")
    for key, (shape, dtype) in shapes.items():
        if dtype.is_floating_point is False or dtype.itemsize < 2:
            raise ConversionError(f"{ckpt_dir}: tensor {key} is stored as {dtype} (quantized); import a checkpoint "
                                  f"with bf16 or fp32 weights")
    model = model_from_fields(fields, shapes[embedding][0][0], name, where)
    renamed = check_weights(model, shapes, prefix, ckpt_dir)
    precision = "bf16" if fields.get("bf16") else "fp32"
    run_args = {"megatron-lm": lambda: vars(common["args"]), "bridge": lambda: _bridge_args(config_file)}
    saved_layout, ddp = _saved_layout(run_args[kind]() if kind in run_args else {})
    tokenizers = [ckpt_dir / "tokenizer", path / "context" / "nemo_tokenizer"]
    return Source(
        tokenizer_dir=next((d for d in tokenizers if d.is_dir()), None),
        kind=kind, path=path, ckpt_dir=ckpt_dir, iteration=int(iteration), model=model, precision=precision,
        prefix=prefix, optimizer_format=_optimizer_format(common),
        renamed=renamed, training=training, saved_layout=saved_layout, ddp=ddp,
        optimizer_metadata={k: v for k, v in (common.get("content_metadata") or {}).items()
                            if k in ("chained_optim_avoid_prefix", "singleton_local_shards")},
    )
