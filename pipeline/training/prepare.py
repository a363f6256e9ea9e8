"""The model as training uses it: built, initialised and wrapped for data-parallel gradients.

One function, used by the trainer, the benchmarks (bench/train.py, bench/checkpoint_save.py) and the
GPU tests, so that what they measure is what users train.
"""

from pipeline.distributed import ParallelConfig
from pipeline.errors import ConfigError
from pipeline.model.build import build_model, check_gpu_only_options, check_precision_supported
from pipeline.model.config import ModelConfig
from pipeline.model.precision import PrecisionConfig
from pipeline.training.config import TrainConfig


def check_machine(precision: PrecisionConfig, train: TrainConfig, parallel: ParallelConfig, device) -> None:
    """ConfigError for what `build_training_chunks` cannot build on `device`: FP8 without FP8 tensor
    cores, CUDA graphs, the fused cross entropy or TP communication overlap without a GPU. Checked
    before a run writes anything (and for every job of a sweep before the first starts)."""
    check_precision_supported(precision, device)
    check_gpu_only_options(device, cuda_graphs=train.cuda_graphs, fused_cross_entropy=train.fused_cross_entropy)
    check_parallel_supported(parallel, device)


def check_parallel_supported(parallel: ParallelConfig, device) -> None:
    """ConfigError for a `parallel` option this device cannot run (checked before run_dir is touched)."""
    if parallel.tp_comm_overlap and device.type != "cuda":
        raise ConfigError(f"parallel.tp_comm_overlap=true needs GPUs (Transformer Engine userbuffers; this run is "
                          f"on {device.type}); set parallel.tp_comm_overlap=false")


def _initialize_tp_comm_overlap(model: ModelConfig, precision: PrecisionConfig, train: TrainConfig,
                                parallel: ParallelConfig) -> None:
    """Transformer Engine's userbuffers for TP communication overlap, sized for one micro-batch's
    activations on this rank, 1/cp of each sequence (what Megatron-LM's `_initialize_tp_communicators`
    does with its default configs)."""
    from transformer_engine.pytorch.module.base import initialize_ub

    tokens = train.seq_length * train.micro_batch_size // parallel.cp
    initialize_ub(shape=[tokens, model.hidden_size], tp_size=parallel.tp, use_fp8=precision.fp8 is not None,
                  bootstrap_backend="nccl")


def build_training_chunks(model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig,
                          train: TrainConfig, device) -> list:
    """This rank's model chunks, in this order:

    1. with `parallel.tp_comm_overlap`, Transformer Engine's userbuffers set up (before the layers
       that use them are built);
    2. built and initialised from `train.seed` (`build_model`: one chunk per virtual pipeline stage,
       `train.cuda_graphs`, `train.fused_cross_entropy`, `train.recompute`, `parallel.fp8_param_gather`
       applied);
    3. each wrapped in megatron-core's DistributedDataParallel: gradient buffers in
       `parallel.grad_reduce_dtype`, laid out for the distributed optimizer when
       `parallel.distributed_optimizer`; with `parallel.overlap_grad_reduce` reduced bucket by bucket
       during the backward (bucketing only in the first chunk), else all at once after it; with
       `parallel.overlap_param_gather` the updated parameters all-gathered during the next forward;
    4. the model config's hooks set, which megatron's pipeline schedules call: `finalize_model_grads_func`
       (reduce gradients across data-parallel ranks, tied weights across stages) and, with overlapped
       gradient reduce, `no_sync_func` (no reduce before a micro-batch's last backward) and
       `grad_sync_func` (each chunk's reduce launched at its last backward, aligned across stages).

    Needs `pipeline.distributed.distributed(...)` to be active.
    """
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads

    check_parallel_supported(parallel, device)
    if parallel.tp_comm_overlap:
        _initialize_tp_comm_overlap(model, precision, train, parallel)
    chunks = build_model(model, parallel, precision, train.seed, device,
                         cuda_graphs=train.cuda_graphs, fused_cross_entropy=train.fused_cross_entropy,
                         recompute=train)
    config = chunks[0].config
    wrapped = [
        DistributedDataParallel(config=config, ddp_config=_ddp_config(parallel), module=c, disable_bucketing=i > 0)
        for i, c in enumerate(chunks)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    if parallel.overlap_grad_reduce:
        # Megatron-LM's training loop sets these (align_grad_reduce, its default); without no_sync the
        # first micro-batch's backward would launch the reduce and the second would find it in flight.
        no_sync = [c.no_sync for c in wrapped]
        grad_sync = [c.start_grad_sync for c in wrapped]
        config.no_sync_func = no_sync[0] if len(wrapped) == 1 else no_sync
        config.grad_sync_func = grad_sync[0] if len(wrapped) == 1 else grad_sync
    return wrapped


def _ddp_config(parallel: ParallelConfig):
    from megatron.core.distributed import DistributedDataParallelConfig

    # A fresh one per chunk: DistributedDataParallel writes its bucket size back into the config.
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=parallel.grad_reduce_dtype == "fp32",
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather,
        bucket_size=parallel.bucket_size,
        fp8_param_gather=parallel.fp8_param_gather,
        use_distributed_optimizer=parallel.distributed_optimizer,
    )


def gather_params(chunks: list) -> None:
    """Make every rank's full parameters current. With `parallel.overlap_param_gather` the all-gather
    after an optimizer step finishes only during the next forward, so a checkpoint saved or an
    evaluation run before it would read the previous step's weights outside this rank's shard (what
    Megatron-LM's `disable_forward_pre_hook` before saving and evaluating is for)."""
    for chunk in chunks:
        if chunk.ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)
