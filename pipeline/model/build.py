"""Build this rank's part of the hybrid model (a megatron-core HybridModel per pipeline chunk).

Backend: `te` (Transformer Engine + mamba-ssm kernels) on GPU, `portable` (plain PyTorch) on CPU;
both give identical parameter names, checkpoint keys and initial weights.
"""

import torch
from megatron.core.activations import squared_relu
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.transformer.transformer_config import TransformerConfig

from pipeline.distributed import ParallelConfig
from pipeline.errors import ConfigError
from pipeline.model.config import ModelConfig
from pipeline.model.init import initialize_weights
from pipeline.model.pattern import ATTENTION, MAMBA, MOE, megatron_pattern, split_stages
from pipeline.model.precision import PrecisionConfig
from pipeline.model.spec import stack_spec
from pipeline.training.config import TrainConfig, recompute_modules

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def default_backend(device: torch.device) -> str:
    """`te` on CUDA, `portable` elsewhere."""
    return "te" if device.type == "cuda" else "portable"


def virtual_stages(model: ModelConfig, parallel: ParallelConfig) -> int | None:
    """Virtual pipeline stages per rank implied by the pattern's segments (None when 1)."""
    vp = len(split_stages(model.parsed_pattern(), parallel.pp)[0])
    return vp if vp > 1 else None


def check_precision_supported(precision: PrecisionConfig, device: torch.device) -> None:
    """FP8 needs a CUDA GPU with FP8 tensor cores (Hopper or newer; MXFP8 Blackwell)."""
    if not precision.fp8:
        return
    if device.type != "cuda":
        raise ConfigError(
            f"precision={precision.name} uses FP8, which needs a GPU (this run is on {device.type}); "
            f"use precision=bf16 or precision=fp32"
        )
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ConfigError(
            f"precision={precision.name} needs FP8 tensor cores (compute capability >= 8.9), this GPU "
            f"has {major}.{minor}; use precision=bf16"
        )
    if precision.fp8_recipe == "mxfp8" and major < 10:
        raise ConfigError(f"precision={precision.name} (MXFP8) needs a Blackwell GPU; use precision=fp8_tensorwise")


def check_gpu_only_options(device: torch.device, **options: bool) -> None:
    """ConfigError naming the first train.<option> switched on that needs a GPU this run does not have."""
    for name, on in options.items():
        if on and device.type != "cuda":
            raise ConfigError(f"train.{name}=true needs a GPU (this run is on {device.type}); set train.{name}=false")


def check_moe_supported(model: ModelConfig, device: torch.device, backend: str) -> None:
    """The MoE options that need Transformer Engine or a GPU, refused in one line on the portable backend."""
    if MOE not in model.parsed_pattern().layers or backend == "te":
        return
    if model.moe.token_dispatcher == "flex":
        raise ConfigError(f"model.moe.token_dispatcher=flex (DeepEP/HybridEP) needs a GPU (this run is on "
                          f"{device.type}); use model.moe.token_dispatcher=alltoall")
    if model.moe.latent_size is not None:
        raise ConfigError(f"model.moe.latent_size needs Transformer Engine (megatron-core builds the latent "
                          f"projections as TELinear; this run is on {device.type}); set model.moe.latent_size=null")
    if model.moe.router_fusion:
        raise ConfigError(f"model.moe.router_fusion=true needs Transformer Engine's fused router kernels (this run "
                          f"is on {device.type}); set model.moe.router_fusion=false")


def check_context_parallel_supported(model: ModelConfig, parallel: ParallelConfig, backend: str) -> None:
    """The portable attention splits heads over context-parallel ranks (an all-to-all), so its heads
    and KV groups per tensor-parallel rank must divide among them; Transformer Engine's ring does not
    need that."""
    if parallel.cp == 1 or backend == "te" or ATTENTION not in model.parsed_pattern().layers:
        return
    heads, groups = model.num_attention_heads // parallel.tp, model.num_query_groups // parallel.tp
    if heads % parallel.cp or (groups % parallel.cp and parallel.cp % groups):
        raise ConfigError(
            f"parallel.cp={parallel.cp} on the portable backend splits the {heads} attention heads and "
            f"{groups} KV groups of a tensor-parallel rank over the cp ranks; use a parallel.cp that divides "
            f"{heads} and divides or is a multiple of {groups}"
        )


def moe_config(model: ModelConfig, parallel: ParallelConfig, on_gpu: bool, fp8: bool) -> dict:
    """megatron-core's TransformerConfig `moe_*` fields for the `E` layers (none without them)."""
    if MOE not in model.parsed_pattern().layers:
        return {}
    moe = model.moe
    # Transformer Engine's fused token permutation on GPU: the unfused permute is a chain of small
    # ops that costs several % of a bench_moe step. FP8 routing-map padding stays off, as in
    # Megatron-Bridge's H100 Nemotron 3 Nano recipe: with FP8 it failed the backward on an H100 (an
    # in-place write to the routing map autograd still needed).
    fused = dict(moe_permute_fusion=True, moe_router_fusion=moe.router_fusion) if on_gpu else {}
    return dict(
        **fused,
        num_moe_experts=moe.num_experts,
        moe_ffn_hidden_size=moe.ffn_hidden_size,
        moe_shared_expert_intermediate_size=moe.shared_ffn_hidden_size or None,
        moe_router_topk=moe.top_k,
        moe_router_score_function=moe.score_function,
        moe_router_enable_expert_bias=moe.expert_bias,
        moe_router_bias_update_rate=moe.bias_update_rate,
        moe_router_topk_scaling_factor=moe.scaling_factor,
        moe_router_num_groups=moe.num_groups,
        moe_router_group_topk=moe.topk_groups,
        moe_router_load_balancing_type=moe.aux_loss,
        moe_aux_loss_coeff=moe.aux_loss_coeff,
        moe_router_dtype=None if moe.router_dtype == "model" else moe.router_dtype,
        moe_token_dispatcher_type=moe.token_dispatcher,
        moe_expert_capacity_factor=moe.capacity_factor,
        moe_token_drop_policy=moe.drop_policy,
        moe_pad_expert_input_to_capacity=moe.pad_to_capacity,
        moe_latent_size=moe.latent_size,
        # The hybrid TE spec builds experts as TEGroupedMLP (hybrid_layer_specs.py).
        moe_grouped_gemm=True,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp,
    )


def graphed_modules(model: ModelConfig) -> list[str]:
    """What `train.cuda_graphs` captures: whole layers, or, with `E` layers, every static part.

    A dropless MoE layer's expert computation has a data-dependent shape, so megatron-core graphs
    only the router there (and the dispatcher's preprocessing unless a capacity factor makes it sync
    with the host before the permutation); Mamba and attention layers are captured whole. Dense FFN
    (`-`) layers beside `E` layers stay eager: megatron-core 0.19 refuses the "mlp" scope when
    `moe_layer_freq` is 1, which it always is for hybrid models (the pattern places the MoE layers).
    """
    layers = model.parsed_pattern().layers
    if MOE not in layers:
        return []
    modules = [name for symbol, name in ((MAMBA, "mamba"), (ATTENTION, "attn")) if symbol in layers]
    modules.append("moe_router")
    if model.moe.capacity_factor is None:
        modules.append("moe_preprocess")
    return modules


def recompute_config(model: ModelConfig, train: TrainConfig | None) -> dict:
    """megatron-core's TransformerConfig `recompute_*` fields for `train.recompute` (none without it)."""
    if train is None or train.recompute == "none":
        return {}
    if train.recompute == "full":
        return dict(recompute_granularity="full", recompute_method=train.recompute_method,
                    recompute_num_layers=train.recompute_num_layers)
    layers = model.parsed_pattern().layers
    return dict(recompute_granularity="selective", recompute_modules=recompute_modules(
        train, layers, MOE in layers and model.moe.shared_ffn_hidden_size > 0))


def transformer_config(
    model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, device: torch.device, vp: int | None,
    cuda_graphs: bool = False, fused_cross_entropy: bool = False, train: TrainConfig | None = None,
) -> TransformerConfig:
    """megatron-core's TransformerConfig for this model, layout and precision; `train` gives the
    activation recompute (`train.recompute`)."""
    dtype = DTYPES[precision.params_dtype]
    on_gpu = device.type == "cuda"
    graphs = {}
    if fused_cross_entropy:
        # Transformer Engine's one-kernel cross entropy: the unfused one makes ~10 fp32 passes over
        # the [tokens, vocabulary] logits, a few % of the step at vocabulary 131k.
        graphs.update(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="te")
    if cuda_graphs:
        # "local": megatron-core's own per-layer graphs, the implementation whose graph inputs may be a
        # PackedSeqParams (Transformer Engine's make_graphed_callables path takes no packed sequences).
        # An empty module list graphs whole layers. The RNG tracker must be graph-safe (build_model).
        graphs.update(cuda_graph_impl="local", cuda_graph_modules=graphed_modules(model),
                      use_te_rng_tracker=True)
    fp8 = {}
    if precision.fp8:
        fp8 = dict(
            fp8=precision.fp8,
            fp8_recipe=precision.fp8_recipe,
            fp8_amax_history_len=precision.fp8_amax_history_len,
            fp8_amax_compute_algo="max",
            first_last_layers_bf16=precision.first_last_layers_bf16,
            num_layers_at_start_in_bf16=precision.num_layers_at_start_in_bf16,
            num_layers_at_end_in_bf16=precision.num_layers_at_end_in_bf16,
            # FP8 weights (TE's fp8_model_init), which the DDP's fp8_param_gather all-gathers.
            fp8_param=parallel.fp8_param_gather,
        )
    return TransformerConfig(
        num_layers=model.parsed_pattern().num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        mamba_num_heads=model.mamba_num_heads,
        mamba_head_dim=model.mamba_head_dim,
        mamba_num_groups=model.mamba_num_groups,
        mamba_state_dim=model.mamba_state_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.layernorm_epsilon,
        add_bias_linear=False,
        add_qkv_bias=False,
        gated_linear_unit=False,
        activation_func=squared_relu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        # pipeline.model.init draws every weight itself, layout-independently.
        perform_initialization=False,
        use_cpu_initialization=not on_gpu,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=vp,
        context_parallel_size=parallel.cp,
        # Transformer Engine's ring exchange of K/V blocks: no condition on the heads (the portable
        # attention exchanges heads instead; check_context_parallel_supported).
        cp_comm_type="p2p" if parallel.cp > 1 else None,
        sequence_parallel=parallel.sequence_parallel,
        tp_comm_overlap=parallel.tp_comm_overlap,
        pipeline_dtype=dtype,
        # The fused kernels behind these flags are CUDA-only.
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        persist_layer_norm=on_gpu,
        gradient_accumulation_fusion=False,
        # gloo matches messages between two ranks by order only: with PP=2 and virtual stages the
        # previous and next rank are the same process and batched sends in both directions can be
        # received swapped. The unbatched path puts the two directions on different groups.
        batch_p2p_comm=on_gpu,
        **moe_config(model, parallel, on_gpu, bool(precision.fp8)),
        **fp8,
        **graphs,
        **recompute_config(model, train),
    )


def build_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    seed: int,
    device: torch.device,
    backend: str | None = None,
    cuda_graphs: bool = False,
    fused_cross_entropy: bool = False,
    recompute: TrainConfig | None = None,
    spec=None,
) -> list[HybridModel]:
    """This rank's model chunks (one per virtual pipeline stage), initialised from `seed`.

    `spec` builds that layer spec instead of the backend's (bench/compress_modelopt.py: modelopt
    prunes MoE layers only with SequentialMLP experts).

    `cuda_graphs` makes every layer a megatron-core CUDA graph module (captured by the schedule at
    the end of the first training step; `release_cuda_graphs` frees them); `fused_cross_entropy`
    computes the loss with Transformer Engine's fused kernel. Both are GPU-only. `recompute` (a
    TrainConfig) sets the activation recompute of train.recompute. Needs
    `pipeline.distributed.distributed(...)` to be active.
    """
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    backend = backend or default_backend(device)
    check_precision_supported(precision, device)
    check_moe_supported(model, device, backend)
    check_context_parallel_supported(model, parallel, backend)
    check_gpu_only_options(device, cuda_graphs=cuda_graphs, fused_cross_entropy=fused_cross_entropy)
    vp = virtual_stages(model, parallel)
    config = transformer_config(model, parallel, precision, device, vp, cuda_graphs, fused_cross_entropy, recompute)
    pattern = megatron_pattern(model.parsed_pattern(), parallel.pp)
    spec = spec or stack_spec(model, backend)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    # MambaMixer and TE layers draw (then we overwrite) weights under megatron's CUDA RNG tracker, and
    # the embedding forks it under sequence parallel (on CPU too, where cpu_mode gives the tracker
    # names without a generator). Graphed layers need TE's graph-safe tracker; the reset replaces a
    # tracker of the other kind that an earlier model in this process installed.
    model_parallel_cuda_manual_seed(seed, te_rng_tracker=cuda_graphs, force_reset_rng=cuda_graphs)
    chunks = []
    for stage in range(vp or 1):
        vp_stage = stage if vp else None
        chunk = HybridModel(
            config=config,
            hybrid_stack_spec=spec,
            vocab_size=model.padded_vocab_size,
            max_sequence_length=model.seq_length,
            hybrid_layer_pattern=pattern,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=False,
            position_embedding_type="none",
            pg_collection=pg,
            vp_stage=vp_stage,
        )
        chunks.append(chunk.to(device))
    initialize_weights(chunks, model, seed)
    _mark_routed_experts_expert_parallel(chunks)
    # Like megatron's Float16Module: every parameter in the compute dtype (Mamba's A_log and D are
    # created in fp32), the optimizer keeps fp32 main copies. One dtype also keeps the distributed
    # optimizer to a single grad buffer per chunk.
    return [chunk.to(config.params_dtype) for chunk in chunks]


def _mark_routed_experts_expert_parallel(chunks: list) -> None:
    """Put the routed experts' parameters in megatron's expert groups (`allreduce=False`) at every layout.

    megatron-core does so only with EP > 1 or ETP != TP; otherwise the experts join the dense
    parameters, the distributed optimizer becomes one optimizer instead of a dense + expert pair, and
    its checkpointed state no longer matches one saved at another EP (so EP2 could not resume at EP1).
    At EP1 with ETP = TP the expert groups hold the same ranks as the dense ones, so gradients, their
    reduction and the norm are unchanged; only the bookkeeping is the same at every layout.
    """
    from megatron.core.transformer.moe.moe_layer import MoELayer

    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, MoELayer):
                for param in module.experts.parameters():
                    param.allreduce = False


def release_cuda_graphs() -> None:
    """Forget the CUDA graphs megatron-core captured in this process (its record is global), so that
    a later model in the same process captures its own."""
    from megatron.core.transformer.cuda_graphs import delete_cuda_graphs

    delete_cuda_graphs()
