"""The model as training uses it: built, initialised and wrapped for data-parallel gradients.

One function, used by the trainer, the benchmarks (bench/train.py, bench/checkpoint_save.py) and the
GPU tests, so that what they measure is what users train.
"""

from pipeline.distributed import ParallelConfig
from pipeline.model.build import build_model, check_gpu_only_options, check_precision_supported
from pipeline.model.config import ModelConfig
from pipeline.model.precision import PrecisionConfig
from pipeline.training.config import TrainConfig


def check_machine(precision: PrecisionConfig, train: TrainConfig, device) -> None:
    """ConfigError for what `build_training_chunks` cannot build on `device`: FP8 without FP8 tensor
    cores, CUDA graphs or the fused cross entropy without a GPU. Checked before a run writes anything
    (and for every job of a sweep before the first starts)."""
    check_precision_supported(precision, device)
    check_gpu_only_options(device, cuda_graphs=train.cuda_graphs, fused_cross_entropy=train.fused_cross_entropy)


def build_training_chunks(model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig,
                          train: TrainConfig, device) -> list:
    """This rank's model chunks, in this order:

    1. built and initialised from `train.seed` (`build_model`: one chunk per virtual pipeline stage,
       `train.cuda_graphs` and `train.fused_cross_entropy` applied);
    2. each wrapped in megatron-core's DistributedDataParallel: fp32 gradient buffers, reduced after
       the backward (no overlap), bucketing only in the first chunk, laid out for the distributed
       optimizer when `parallel.distributed_optimizer`;
    3. the model config's `finalize_model_grads_func` set, which the pipeline schedules call to reduce
       gradients across data-parallel ranks (and tied weights across stages).

    Needs `pipeline.distributed.distributed(...)` to be active.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    chunks = build_model(model, parallel, precision, train.seed, device,
                         cuda_graphs=train.cuda_graphs, fused_cross_entropy=train.fused_cross_entropy)
    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=parallel.distributed_optimizer,
    )
    wrapped = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
        for i, c in enumerate(chunks)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped
