"""AdamW and its learning-rate schedule, both from megatron-core."""

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from pipeline.training.config import OptimConfig

_STYLES = {"cosine": "cosine", "wsd": "WSD", "linear": "linear", "constant": "constant"}


def build_optimizer(chunks: list, cfg: OptimConfig, model_config, distributed_optimizer: bool):
    """megatron-core's (distributed) Adam with decoupled weight decay over the DDP-wrapped chunks.

    megatron-core already exempts 1-D parameters (norm weights, A_log, D, dt_bias) and biases
    from weight decay.
    """
    config = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.beta1,
        adam_beta2=cfg.beta2,
        adam_eps=cfg.eps,
        clip_grad=cfg.clip_grad,
        bf16=model_config.bf16,
        params_dtype=model_config.params_dtype,
        use_distributed_optimizer=distributed_optimizer,
    )
    return get_megatron_optimizer(config, chunks)


def build_scheduler(optimizer, cfg: OptimConfig, iters: int) -> OptimizerParamScheduler:
    """Linear warmup to `lr`, then the configured decay to `min_lr` by `iters` (counted in steps)."""
    warmup = min(cfg.warmup_iters, max(iters - 1, 0))
    wsd_decay = cfg.wsd_decay_iters or max(1, iters // 5)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(iters, warmup + 1),
        lr_decay_style=_STYLES[cfg.schedule],
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=max(iters, 1),
        wd_incr_style="constant",
        wsd_decay_steps=wsd_decay if cfg.schedule == "wsd" else None,
        lr_wsd_decay_style="cosine" if cfg.schedule == "wsd" else None,
        # On resume the configured schedule wins over the checkpoint's (a changed optim.lr/min_lr or
        # train.iters applies from the resumed step; pipeline/training/state.py logs the change).
        override_opt_param_scheduler=True,
        use_checkpoint_opt_param_scheduler=False,
    )
