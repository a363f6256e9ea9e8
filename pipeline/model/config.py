"""The model's shape: the `model` config group (conf/model/*.yaml) is validated against this."""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pipeline.errors import ConfigError
from pipeline.model.pattern import ATTENTION, MAMBA, MOE, parse_pattern

SCORE_FUNCTIONS = ("softmax", "sigmoid")
AUX_LOSSES = ("none", "aux_loss", "seq_aux_loss", "global_aux_loss")
ROUTER_DTYPES = ("fp32", "fp64", "model")
DISPATCHERS = ("alltoall", "allgather", "flex")
DROP_POLICIES = ("probs", "position")


@dataclass
class MoEConfig:
    """The mixture-of-experts FFN of the `E` layers (megatron-core's MoELayer; names as in its
    TransformerConfig `moe_*` fields). Unused, and must stay at num_experts=0, without `E` layers."""

    num_experts: int = 0
    """Routed experts per `E` layer (megatron `num_moe_experts`); 0 = the model has no `E` layers."""
    top_k: int = 2
    """Experts each token is routed to (`moe_router_topk`)."""
    ffn_hidden_size: int = 128
    """Width of one routed expert's squared-ReLU FFN (`moe_ffn_hidden_size`)."""
    shared_ffn_hidden_size: int = 0
    """Width of the shared expert every token passes through; 0 = none
    (`moe_shared_expert_intermediate_size`)."""
    score_function: str = "softmax"
    """Router scores: softmax or sigmoid (sigmoid scores of the top-k are renormalised for k > 1)."""
    expert_bias: bool = False
    """Aux-loss-free balancing: a per-expert bias added to the scores for top-k selection only,
    nudged each step toward equal load (`moe_router_enable_expert_bias`; needs sigmoid)."""
    bias_update_rate: float = 1e-3
    """Step size of the expert-bias update (`moe_router_bias_update_rate`)."""
    scaling_factor: Optional[float] = None
    """Multiplies the routing weights of the top-k experts (`moe_router_topk_scaling_factor`)."""
    num_groups: Optional[int] = None
    """Group-limited routing: experts split into this many groups (`moe_router_num_groups`)."""
    topk_groups: Optional[int] = None
    """Groups a token may pick its experts from (`moe_router_group_topk`)."""
    aux_loss: str = "aux_loss"
    """Load-balancing loss: none, aux_loss (per micro-batch), seq_aux_loss (per sequence) or
    global_aux_loss (`moe_router_load_balancing_type`)."""
    aux_loss_coeff: float = 0.0
    """Weight of the load-balancing loss in the objective (`moe_aux_loss_coeff`)."""
    router_dtype: str = "fp32"
    """Precision of the router's GEMM and scores: fp32, fp64 or model (the compute dtype)."""
    token_dispatcher: str = "alltoall"
    """How tokens reach experts on other EP ranks: alltoall, allgather, or flex (DeepEP/HybridEP,
    GPU only)."""
    capacity_factor: Optional[float] = None
    """Token-dropping: each expert takes at most capacity_factor x its fair share; None = dropless."""
    drop_policy: str = "probs"
    """Which tokens an over-full expert drops: lowest routing probability (probs) or latest (position)."""
    pad_to_capacity: bool = False
    """Pad every expert's input to its capacity (needs capacity_factor)."""
    latent_size: Optional[int] = None
    """Latent MoE (Nemotron 3 Super): experts work in this smaller width between a down and an up
    projection (`moe_latent_size`; needs Transformer Engine, so GPU only)."""
    router_fusion: bool = False
    """Transformer Engine's fused router kernels: scores, top-k and the aux-loss statistics in one
    kernel each (`moe_router_fusion`; GPU only). Off by default, as in Megatron-Bridge's H100
    Nemotron 3 Nano recipe; docs/performance.md ("Mixture of experts") measures both."""

    def check(self) -> None:
        """One-line ConfigError for impossible settings (called by ModelConfig with `E` layers)."""
        for name in ("num_experts", "top_k", "ffn_hidden_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.moe.{name}={getattr(self, name)} must be positive")
        if self.shared_ffn_hidden_size < 0:
            raise ConfigError(f"model.moe.shared_ffn_hidden_size={self.shared_ffn_hidden_size} must be >= 0 (0: none)")
        for name, allowed in (("score_function", SCORE_FUNCTIONS), ("aux_loss", AUX_LOSSES),
                              ("router_dtype", ROUTER_DTYPES), ("token_dispatcher", DISPATCHERS),
                              ("drop_policy", DROP_POLICIES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.moe.{name}={getattr(self, name)!r}; use one of {', '.join(allowed)}")
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"model.moe.top_k={self.top_k} exceeds model.moe.num_experts={self.num_experts}; "
                f"lower model.moe.top_k"
            )
        if self.top_k == 1 and self.score_function == "softmax":
            # megatron-core: a softmax over the single chosen logit is 1 and has no gradient.
            raise ConfigError("model.moe.top_k=1 with score_function=softmax gives the router no gradient; "
                              "use model.moe.score_function=sigmoid or top_k >= 2")
        if self.expert_bias and self.score_function != "sigmoid":
            raise ConfigError("model.moe.expert_bias=true needs model.moe.score_function=sigmoid")
        if self.bias_update_rate < 0 or self.aux_loss_coeff < 0:
            raise ConfigError("model.moe.bias_update_rate and model.moe.aux_loss_coeff must be >= 0")
        if self.aux_loss_coeff > 0 and self.aux_loss == "none":
            raise ConfigError(f"model.moe.aux_loss_coeff={self.aux_loss_coeff} with aux_loss=none; "
                              f"choose model.moe.aux_loss=aux_loss or seq_aux_loss, or set the coefficient to 0")
        if (self.num_groups is None) != (self.topk_groups is None):
            raise ConfigError("group routing needs both model.moe.num_groups and model.moe.topk_groups (or neither)")
        if self.num_groups is not None:
            if self.num_groups <= 0 or self.num_experts % self.num_groups:
                raise ConfigError(f"model.moe.num_experts={self.num_experts} not divisible by "
                                  f"model.moe.num_groups={self.num_groups}; use a group count that divides it")
            if not 0 < self.topk_groups <= self.num_groups:
                raise ConfigError(f"model.moe.topk_groups={self.topk_groups} must be in 1..model.moe.num_groups="
                                  f"{self.num_groups}")
            if self.top_k > self.topk_groups * (self.num_experts // self.num_groups):
                raise ConfigError(f"model.moe.top_k={self.top_k} exceeds the experts in topk_groups={self.topk_groups} "
                                  f"groups; raise model.moe.topk_groups")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError(f"model.moe.capacity_factor={self.capacity_factor} must be positive (null: dropless)")
        if self.pad_to_capacity and self.capacity_factor is None:
            raise ConfigError("model.moe.pad_to_capacity=true needs model.moe.capacity_factor")
        if self.latent_size is not None and self.latent_size <= 0:
            raise ConfigError(f"model.moe.latent_size={self.latent_size} must be positive (null: no latent MoE)")


@dataclass
class ModelConfig:
    """A Nemotron-H-style hybrid: Mamba-2, attention and squared-ReLU FFN layers by `pattern`."""

    name: str = "tiny"
    """Preset name, used in run names and logs."""
    pattern: str = "M-M*-"
    """One symbol per layer: M Mamba-2, * attention, - FFN; '|' separates pipeline segments."""
    num_layers: Optional[int] = None
    """Optional check: when set, must equal the number of layers in `pattern`."""
    hidden_size: int = 64
    ffn_hidden_size: int = 256
    """Width of the squared-ReLU FFN (up -> relu^2 -> down, not gated)."""
    num_attention_heads: int = 4
    num_query_groups: int = 2
    """Key/value heads (GQA groups)."""
    kv_channels: int = 16
    """Attention head dimension."""
    mamba_num_heads: int = 8
    mamba_head_dim: int = 16
    mamba_num_groups: int = 2
    mamba_state_dim: int = 16
    mamba_conv_kernel: int = 4
    mamba_chunk_size: int = 16
    """Chunk length of the SSD scan (128 in the published models)."""
    vocab_size: int = 4096
    """Tokenizer vocabulary; the embedding is padded to a multiple of `make_vocab_size_divisible_by`."""
    make_vocab_size_divisible_by: int = 128
    seq_length: int = 256
    """Maximum (training) sequence length."""
    layernorm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Sizes and routing of the mixture-of-experts (`E`) layers."""

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            # ModelConfig(**fields) from a checkpoint's or HF import's saved dict.
            self.moe = MoEConfig(**self.moe)
        layers = self.parsed_pattern().layers
        if self.num_layers is not None and self.num_layers != len(layers):
            raise ConfigError(
                f"model.num_layers={self.num_layers} but model.pattern has {len(layers)} layers; "
                f"fix the pattern or set model.num_layers={len(layers)}"
            )
        positive = (
            "hidden_size ffn_hidden_size num_attention_heads num_query_groups kv_channels "
            "mamba_num_heads mamba_head_dim mamba_num_groups mamba_state_dim mamba_conv_kernel "
            "mamba_chunk_size vocab_size make_vocab_size_divisible_by seq_length"
        ).split()
        for name in positive:
            value = getattr(self, name)
            if value <= 0:
                raise ConfigError(f"model.{name}={value} must be positive")
        if MAMBA in layers and self.mamba_num_heads % self.mamba_num_groups:
            raise ConfigError(
                f"model.mamba_num_heads={self.mamba_num_heads} not divisible by "
                f"model.mamba_num_groups={self.mamba_num_groups}; use heads that are a multiple "
                f"of groups"
            )
        if ATTENTION in layers and self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} not divisible by "
                f"model.num_query_groups={self.num_query_groups}; use heads that are a multiple "
                f"of KV groups"
            )
        if MOE in layers:
            if self.moe.num_experts == 0:
                raise ConfigError("model.pattern has 'E' (MoE) layers but model.moe.num_experts=0; "
                                  "set model.moe.num_experts")
            self.moe.check()
        elif self.moe.num_experts:
            raise ConfigError(f"model.moe.num_experts={self.moe.num_experts} but model.pattern has no 'E' layer; "
                              f"add 'E' layers or set model.moe.num_experts=0")

    def parsed_pattern(self):
        """The validated `Pattern` of this model."""
        return parse_pattern(self.pattern)

    def check_tokenizer(self, tokenizer_vocab_size: int) -> None:
        """The embedding must have a row for every token the tokenizer can produce."""
        if tokenizer_vocab_size > self.vocab_size:
            raise ConfigError(
                f"model.vocab_size={self.vocab_size} is smaller than the tokenizer's vocabulary "
                f"({tokenizer_vocab_size}); set model.vocab_size={tokenizer_vocab_size} or more"
            )

    @property
    def mamba_d_inner(self) -> int:
        """Mamba inner width: heads x head dim (not 2 x hidden for Nano-2 or pruned models)."""
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_in_proj_width(self) -> int:
        """Output width of the fused Mamba input projection [z, x, B, C, dt]."""
        return 2 * self.mamba_d_inner + 2 * self.mamba_num_groups * self.mamba_state_dim + self.mamba_num_heads

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows: vocab_size rounded up to make_vocab_size_divisible_by (times TP upstream)."""
        m = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // m) * m


def write_model_option(model: ModelConfig, root: Path, header: str) -> Path:
    """root/model/NAME.yaml: `model` as a Hydra `model` option with every size explicit (use it with
    `hydra.searchpath=[file://root] model=NAME`); `header` is its first comment line."""
    from omegaconf import OmegaConf

    path = Path(root) / "model" / f"{model.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = {k: v for k, v in dataclasses.asdict(model).items() if v is not None}
    if not model.moe.num_experts:
        del fields["moe"]
    path.write_text(f"# {header}\n{OmegaConf.to_yaml(fields)}")
    return path
