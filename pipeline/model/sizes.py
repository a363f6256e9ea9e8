"""Model arithmetic without building a model: parameter counts, training FLOPs, per-GPU memory.

Everything here is a pure function of the config dataclasses, so `python -m pipeline.describe` can
size a 56B model on a laptop. Parameter counts come from the tensor table in `params.py`, exact for
what megatron-core 0.19 builds with the Transformer Engine hybrid spec (norms fused into the
following linear as `layer_norm_weight`, no biases except the Mamba conv, untied embedding and
output layer). FLOPs follow Megatron's convention (docs/performance.md); the memory figure is an
estimate (see `memory_estimate`). Mixture-of-experts (`E`) layers count all their routed experts in
the totals; `active_param_count` and the FLOPs count the path one token takes (router, top-k
routed experts, shared expert).
"""

import math
from dataclasses import dataclass

from pipeline.distributed import ParallelConfig
from pipeline.model import params
from pipeline.model.config import ModelConfig
from pipeline.model.pattern import ATTENTION, LAYER_SYMBOLS, MAMBA, MLP, MOE, SYMBOL_NAMES, split_stages
from pipeline.model.precision import PrecisionConfig
from pipeline.training.config import TrainConfig, recompute_modules

# Adam keeps two fp32 moments per parameter, plus an fp32 master copy when the model is not fp32.
ADAM_MOMENT_BYTES = 8
MASTER_WEIGHT_BYTES = 4
# Megatron DDP accumulates and reduces gradients in buffers of parallel.grad_reduce_dtype (fp32 by
# default, what the Megatron recipes use for BF16/FP8 training); the distributed optimizer does not
# shard them.
DTYPE_BYTES = {"bf16": 2, "fp32": 4}


def param_counts(model: ModelConfig) -> dict[str, int]:
    """Exact parameter count of the whole model: `total` and per component.

    Keys: `embedding`, `output_layer`, `final_norm`, and `mamba`, `attention`, `mlp`, `moe` (all
    layers of that type together, every routed expert counted). The vocabulary is the padded one
    (`model.padded_vocab_size`).
    """
    counts = {
        name: math.prod(params.shape_of(spec, model))
        for name, spec in (
            ("embedding", params.EMBEDDING_TENSOR),
            ("final_norm", params.FINAL_NORM_TENSOR),
            ("output_layer", params.OUTPUT_TENSOR),
        )
    }
    layers = model.parsed_pattern().counts()
    for symbol in LAYER_SYMBOLS:
        name = SYMBOL_NAMES[symbol]
        counts[name] = layers[name] * params.layer_param_count(model, symbol)
    counts["total"] = sum(counts.values())
    return counts


def active_param_count(model: ModelConfig) -> int:
    """Parameters one token passes through: the total less the routed experts it is not sent to
    (num_experts - top_k per `E` layer). Embedding and output layer included; subtract
    `param_counts(...)["embedding"]` (and `output_layer`) for the figure without them."""
    inactive = model.moe.num_experts - model.moe.top_k
    moe_layers = model.parsed_pattern().counts()["moe"]
    return param_counts(model)["total"] - moe_layers * inactive * params.routed_expert_param_count(model)


def moe_forward_flops(model: ModelConfig, tokens: int) -> int:
    """Forward FLOPs of one `E` layer for `tokens` tokens: the router GEMM, the top-k routed experts'
    squared-ReLU FFNs (in the latent width with latent MoE, plus its down/up projections) and the
    shared expert. Megatron-LM's `moe_layer_flops` (megatron/training/training.py, hybrid models)
    is the same without the router's 2*T*h*experts (0.6% of an `E` layer of Nemotron 3 Nano)."""
    moe, h = model.moe, model.hidden_size
    router = 2 * tokens * h * moe.num_experts
    width = moe.latent_size or h
    routed = 4 * tokens * width * moe.ffn_hidden_size * moe.top_k
    latent = 4 * tokens * h * moe.latent_size if moe.latent_size else 0
    shared = 4 * tokens * h * moe.shared_ffn_hidden_size
    return router + routed + latent + shared


def training_flops(model: ModelConfig, tokens: int, seqlen_squared_sum: int) -> int:
    """Training FLOPs (forward + weight grad + input grad = 3x forward) for `tokens` tokens.

    Megatron's convention (`num_floating_point_operations` / `hybrid_flops` in
    megatron/training/training.py): 2 FLOPs per multiply-add, GEMMs and the attention scores
    only (causal attention counted at half, `2*S2*h*p` with S2 the sum of squared sequence lengths),
    the Mamba scan as `7*d_in*N` per token, norms/activations/conv ignored, no recomputation.
    One correction: Megatron hard-codes the Mamba inner width d_in = 2*hidden; we use
    d_in = mamba_num_heads * mamba_head_dim, which differs for Nano-2 and pruned models.
    """
    h, v = model.hidden_size, model.padded_vocab_size
    n, g, kv = model.num_attention_heads, model.num_query_groups, model.kv_channels
    d_in, groups, state = model.mamba_d_inner, model.mamba_num_groups, model.mamba_state_dim
    # Megatron writes ATT = 4*T*h*p*(h + h*g/n) + 2*S2*h*p with p = kv*n/h; multiplied out
    # (h*p = kv*n) it stays an integer.
    attention = 4 * tokens * kv * h * (n + g) + 2 * seqlen_squared_sum * kv * n
    mlp = 4 * tokens * h * model.ffn_hidden_size
    mamba = (
        2 * tokens * h * (2 * d_in + 2 * groups * state + model.mamba_num_heads)
        + 7 * tokens * d_in * state
        + 2 * tokens * d_in * h
    )
    layers = model.parsed_pattern().counts()
    forward = (
        layers["attention"] * attention
        + layers["mlp"] * mlp
        + layers["mamba"] * mamba
        + (layers["moe"] * moe_forward_flops(model, tokens) if layers["moe"] else 0)
        + 2 * tokens * h * v
    )
    return 3 * forward


def flops_per_token(model: ModelConfig, seq_length: int) -> float:
    """Training FLOPs per token for full-length sequences of `seq_length` (S2 = T * seq_length)."""
    return training_flops(model, seq_length, seq_length**2) / seq_length


def flops_per_step(model: ModelConfig, seq_length: int, global_batch: int) -> int:
    """Training FLOPs of one optimizer step over `global_batch` full-length sequences."""
    return training_flops(model, global_batch * seq_length, global_batch * seq_length**2)


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated bytes on one GPU of pipeline rank `pp_rank`. An estimate: see `memory_estimate`."""

    pp_rank: int
    params: int
    """Parameters held by this GPU (its tensor-parallel shard of its pipeline stage)."""
    weights: int
    grads: int
    optimizer: int
    activations: int
    micro_batches_in_flight: float
    """Micro-batches whose activations are held at the peak (1F1B / interleaved warm-up)."""

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations


def stage_param_split(
    model: ModelConfig, tp: int, pp: int, ep: int = 1, etp: int = 1
) -> list[tuple[int, int]]:
    """(dense, routed-expert) parameters on one GPU of each pipeline rank: layers via
    `split_stages` (all virtual stages of the rank), the embedding on the first rank, final norm and
    output layer on the last; tensor-parallel-sharded tensors divided by `tp`, norms replicated;
    routed experts num_experts / ep per GPU, each divided by `etp`."""

    def local(spec: params.TensorSpec) -> int:
        numel = params.local_numel(spec, model, tp, etp)
        return numel * (model.moe.num_experts // ep) if spec.per_expert else numel

    def per_layer(symbol: str, experts: bool) -> int:
        return sum(local(spec) for spec in params.layer_tensors(model, symbol) if spec.per_expert == experts)

    dense = {s: per_layer(s, False) for s in LAYER_SYMBOLS}
    routed = {s: per_layer(s, True) for s in LAYER_SYMBOLS}
    counts = []
    for rank, stages in enumerate(split_stages(model.parsed_pattern(), pp)):
        symbols = "".join(stage.symbols for stage in stages)
        n = sum(dense[s] for s in symbols)
        if rank == 0:
            n += local(params.EMBEDDING_TENSOR)
        if rank == pp - 1:
            n += local(params.FINAL_NORM_TENSOR) + local(params.OUTPUT_TENSOR)
        counts.append((n, sum(routed[s] for s in symbols)))
    return counts


def stage_param_counts(model: ModelConfig, tp: int, pp: int, ep: int = 1, etp: int = 1) -> list[int]:
    """Parameters on one GPU of each pipeline rank (`stage_param_split`, dense + routed experts)."""
    return [dense + experts for dense, experts in stage_param_split(model, tp, pp, ep, etp)]


def activation_bytes_per_token(
    model: ModelConfig, symbol: str, tp: int, sequence_parallel: bool, dtype_bytes: int = 2, etp: int = 1,
    recompute_modules: tuple[str, ...] | list[str] = (),
) -> float:
    """Activation bytes one layer keeps for backward, per token of a micro-batch (estimate).

    Written in the style of Korthikanti et al., "Reducing Activation Recomputation in Large
    Transformer Models" (arXiv:2205.05198): list the tensors saved for backward, `dtype_bytes`
    per element; tensor-parallel regions divide by tp, the norm/residual region only with
    sequence parallel. Assumes no dropout, flash/fused attention (no s x s
    scores) and megatron-core's fused Mamba path, which keeps in_proj's output and the scan
    output and recomputes the conv. Small fp32 per-head tensors (softmax LSE, dt) are ignored.

    Every layer: norm input + normed input (2h, /tp with sequence parallel). Then
      M  in_proj output [z,x,B,C,dt] (2*d_in + 2GN + H), scan output, gated-norm input and
         output (3 * d_in), all /tp
      *  q, k, v ((n + 2g) * kv) and the attention output (n * kv), /tp
      -  fc1 output and squared-ReLU output (2 * ffn), /tp
      E  router logits and scores (2 * experts, fp32 counted as 2 elements each); shared expert as
         `-` (2 * shared, /tp); every token's top_k routed copies: the permuted input (L, the
         latent or hidden width), fc1 and squared-ReLU outputs (2 * expert ffn, /etp) and the
         expert output (L). Averaged over experts: balanced routing, no dropped tokens.
    Selective recompute (`recompute_modules`, megatron-core's names) drops what its modules
    recompute: `mlp` leaves a `-` layer its input (h); `moe` leaves an `E` layer its norm input and
    output; `moe_act` the squared-ReLU outputs of the routed experts, `layernorm` the normed input
    of an `E` layer, `shared_experts` the shared expert's. `core_attn` saves nothing here: with
    fused attention its inputs (q, k, v) are what the checkpoint keeps and its output is kept by
    the projection after it.
    """
    sp = tp if sequence_parallel else 1
    norm_region = 2 * model.hidden_size / sp
    if symbol == MLP and "mlp" in recompute_modules:
        return dtype_bytes * norm_region / 2
    if symbol == MOE and "moe" in recompute_modules:
        return dtype_bytes * norm_region
    if symbol == MAMBA:
        tp_region = model.mamba_in_proj_width + 3 * model.mamba_d_inner
    elif symbol == ATTENTION:
        n, g = model.num_attention_heads, model.num_query_groups
        tp_region = (2 * n + 2 * g) * model.kv_channels
    elif symbol == MLP:
        tp_region = 2 * model.ffn_hidden_size
    elif symbol == MOE:
        moe = model.moe
        width = moe.latent_size or model.hidden_size
        ffn_outputs = 1 if "moe_act" in recompute_modules else 2
        routed = moe.top_k * (2 * width + ffn_outputs * moe.ffn_hidden_size / etp)
        shared = 0 if "shared_experts" in recompute_modules else 2 * moe.shared_ffn_hidden_size / tp
        norm = norm_region / 2 if "layernorm" in recompute_modules else norm_region
        return dtype_bytes * (norm + 4 * moe.num_experts + shared + routed)
    else:
        raise ValueError(f"unknown layer symbol {symbol!r}; use one of {''.join(LAYER_SYMBOLS)}")
    return dtype_bytes * (norm_region + tp_region / tp)


def _output_activation_bytes_per_token(
    model: ModelConfig, tp: int, sp: bool, dtype_bytes: int, fused_cross_entropy: bool = False
) -> float:
    """Final norm (input + output) plus the logits at the loss: the output layer's bf16 logits and
    the fp32 softmax megatron's vocab-parallel cross-entropy keeps (both alive at the peak). With
    train.fused_cross_entropy (TE's kernel, no fp32 copy) 2 x dtype bytes per logit, fitted to the
    bench_1p5b peaks measured on an H100 (tests/unit/test_sizes.py)."""
    norm = 2 * model.hidden_size / (tp if sp else 1)
    per_logit = 2 * dtype_bytes if fused_cross_entropy else dtype_bytes + 4
    return dtype_bytes * norm + per_logit * model.padded_vocab_size / tp


def _micro_batches_in_flight(rank: int, pp: int, vp: int, num_micro_batches: int) -> float:
    """Micro-batches of this rank's activations held at the peak: 1F1B keeps pp - rank; the
    interleaved schedule keeps its warm-up of model chunks (megatron's
    `(pp - rank - 1) * 2 + (vp - 1) * pp` plus the one in flight), each 1/vp of the rank's
    layers."""
    if vp == 1:
        return min(pp - rank, num_micro_batches)
    chunks = min(2 * (pp - rank - 1) + (vp - 1) * pp + 1, num_micro_batches * vp)
    return chunks / vp


def _chunk_activation_bytes(symbols: str, full: dict, kept: dict, layer_input: float,
                            train: TrainConfig) -> tuple[float, float]:
    """Bytes per token one model chunk (a pipeline or virtual stage with layers `symbols`) holds for
    its backward under train.recompute, and the most a recomputation rebuilds at once.

    `full` is each layer type's bytes without recompute, `kept` with the selective modules; a layer
    that full recompute checkpoints keeps only `layer_input` (per group for `uniform`, megatron-
    core's recompute_method) and rebuilds its group's activations during that group's backward.
    """
    if train.recompute == "selective":
        return sum(kept[s] for s in symbols), max(full[s] - kept[s] for s in symbols)
    if train.recompute != "full":
        return sum(full[s] for s in symbols), 0.0
    n = train.recompute_num_layers
    if train.recompute_method == "uniform":
        groups = [symbols[i : i + n] for i in range(0, len(symbols), n)]
        return len(groups) * layer_input, max(sum(full[s] for s in group) for group in groups)
    recomputed, rest = symbols[:n], symbols[n:]
    return (len(recomputed) * layer_input + sum(full[s] for s in rest),
            max(full[s] for s in recomputed))


def stage_memory_estimates(
    model: ModelConfig,
    parallel: ParallelConfig,
    train: TrainConfig,
    precision: PrecisionConfig,
    dp: int,
) -> list[MemoryEstimate]:
    """`memory_estimate` for every pipeline rank, in rank order."""
    tp, pp = parallel.tp, parallel.pp
    dtype_bytes = DTYPE_BYTES[precision.params_dtype]
    master = MASTER_WEIGHT_BYTES if precision.params_dtype != "fp32" else 0
    cp = parallel.cp
    # The distributed optimizer shards over the data- and context-parallel ranks together.
    optimizer_shards = dp * cp if parallel.distributed_optimizer else 1
    # Context parallelism splits every sequence over cp GPUs.
    tokens = train.micro_batch_size * train.seq_length / cp
    num_micro_batches = max(1, train.global_batch_size // (train.micro_batch_size * dp))
    # Routed experts are replicated over, and their optimizer state sharded over, the expert-data-
    # parallel ranks: world / (etp * ep * pp) = tp * cp * dp / (etp * ep).
    expert_shards = max(1, tp * cp * dp // (parallel.etp * parallel.ep)) if parallel.distributed_optimizer else 1
    per_token = {
        s: activation_bytes_per_token(model, s, tp, parallel.sequence_parallel, dtype_bytes, parallel.etp)
        for s in LAYER_SYMBOLS
    }
    layers_of_model = model.parsed_pattern().layers
    modules = recompute_modules(train, layers_of_model, MOE in layers_of_model and model.moe.shared_ffn_hidden_size > 0)
    kept = {
        s: activation_bytes_per_token(model, s, tp, parallel.sequence_parallel, dtype_bytes, parallel.etp, modules)
        for s in LAYER_SYMBOLS
    }
    # What a full recompute keeps of a layer: its input, [s/tp, b, h] with sequence parallel.
    layer_input = dtype_bytes * model.hidden_size / (tp if parallel.sequence_parallel else 1)
    stages = split_stages(model.parsed_pattern(), pp)
    estimates = []
    for rank, (dense, experts) in enumerate(stage_param_split(model, tp, pp, parallel.ep, parallel.etp)):
        params = dense + experts
        in_flight = _micro_batches_in_flight(rank, pp, len(stages[rank]), num_micro_batches)
        held, transient = 0.0, 0.0
        for stage in stages[rank]:
            stage_held, stage_transient = _chunk_activation_bytes(stage.symbols, per_token, kept, layer_input, train)
            held += stage_held
            transient = max(transient, stage_transient)
        # Held for every micro-batch in flight; what a recompute rebuilds lives only during one
        # layer's (or group's) backward.
        activations = (in_flight * held + transient) * tokens
        if rank == pp - 1:
            # The last stage runs the loss and starts backward at once: one micro-batch of logits.
            activations += tokens * _output_activation_bytes_per_token(
                model, tp, parallel.sequence_parallel, dtype_bytes, train.fused_cross_entropy
            )
        estimates.append(
            MemoryEstimate(
                pp_rank=rank,
                params=params,
                weights=params * dtype_bytes,
                grads=params * DTYPE_BYTES[parallel.grad_reduce_dtype],
                optimizer=(dense * (master + ADAM_MOMENT_BYTES) // optimizer_shards
                           + experts * (master + ADAM_MOMENT_BYTES) // expert_shards),
                activations=round(activations),
                micro_batches_in_flight=in_flight,
            )
        )
    return estimates


def memory_estimate(
    model: ModelConfig,
    parallel: ParallelConfig,
    train: TrainConfig,
    precision: PrecisionConfig,
    dp: int,
) -> MemoryEstimate:
    """Estimated peak bytes on one GPU of the most loaded pipeline stage. An estimate, not a
    measurement: allocator fragmentation, communication buffers, CUDA/NCCL context (~1-3 GiB),
    FP8 weight copies and transient workspaces are not included.

    - weights: parameters in `precision.params_dtype`;
    - grads: main-grad buffers in `parallel.grad_reduce_dtype` (fp32 by default), not sharded;
    - optimizer: Adam, fp32 master copy (unless params are fp32) + 2 fp32 moments = 12 bytes per
      parameter, divided by `dp` with the distributed optimizer (routed experts: by the expert
      data-parallel size tp * dp / (etp * ep));
    - activations: one micro-batch of `train.micro_batch_size x train.seq_length / parallel.cp` tokens times the
      micro-batches the pipeline schedule keeps in flight (`activation_bytes_per_token`), less what
      `train.recompute` recomputes (plus what one recomputation rebuilds during the backward).
    Tensor parallel shards every parameter but the RMSNorm weights (and the MoE router); the model is
    split over pipeline ranks by `split_stages` (embedding on the first, output layer on the last);
    each GPU holds num_experts / ep routed experts of every `E` layer, split over etp.

    `dp` is the data-parallel size (world size / (tp * pp * cp)).
    """
    return max(stage_memory_estimates(model, parallel, train, precision, dp), key=lambda e: e.total)


def format_count(n: float) -> str:
    """A count in K/M/B/T units, for tables."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def format_flops(n: float) -> str:
    """FLOPs in MFLOP..EFLOP units, for tables."""
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 1e6:.2f} MFLOP"
