"""The pretraining loop: set up model, optimizer, data and checkpoint state, then step until done.

    from pipeline.config import load_run_config
    from pipeline.training.loop import train
    train(load_run_config(["train.iters=20"]))      # under torchrun for several processes
"""

import os
import pickle
import random
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from pipeline import checkpoint as ckpt
from pipeline.config import RunConfig
from pipeline.data.blend import build_datasets
from pipeline.data.tokenizer import load_tokenizer
from pipeline.distributed import World, distributed
from pipeline.errors import ConfigError
from pipeline.megatron_patches import prime_optimizer_for_loading, untie_adam_steps
from pipeline.metrics import MetricsLogger
from pipeline.model.build import build_model, virtual_stages
from pipeline.model.sizes import flops_per_step
from pipeline.training.batches import step_batches
from pipeline.training.optim import build_optimizer, build_scheduler
from pipeline.training.step import eval_step, train_step

DONE = "DONE"
# Dense peak TFLOP/s of the GPUs we run on, for MFU (H100 SXM; the H200 has the same tensor cores).
# fp32 runs its matmuls as TF32 (494 dense).
PEAK_TFLOPS = {"bf16": 989.0, "fp32": 494.0, "fp8": 1979.0}


@dataclass
class TrainState:
    """Loop counters saved with every checkpoint."""

    step: int = 0
    skipped_steps: int = 0
    nonfinite_in_row: int = 0


class StopRequest:
    """Set by SIGTERM/SIGUSR1 (Slurm's preemption / time-limit warning); acted on at a step end."""

    def __init__(self):
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def agreed(self, device: torch.device) -> bool:
        """True on every rank if any rank was signalled (all ranks must save together)."""
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _ddp_wrap(chunks, world: World, distributed_optimizer: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer,
    )
    wrapped = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
        for i, c in enumerate(chunks)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _sharded_state(chunks, optimizer, scheduler, state: TrainState, world: World, with_rng: bool, loading: bool) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    if loading:
        prime_optimizer_for_loading(optimizer)
    model_state = ckpt.model_sharded_state(chunks)
    sharded = dict(model_state)
    # "fully_reshardable": optimizer state in the canonical per-parameter layout, so a checkpoint
    # resumes at any TP/PP/DP (the default format relies on flattened ranges, unsupported in 0.19).
    sharded["optimizer"] = optimizer.sharded_state_dict(
        model_state, is_loading=loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"}
    )
    sharded["scheduler"] = scheduler.state_dict()
    sharded["train_state"] = asdict(state)
    if with_rng:
        blob = np.frombuffer(pickle.dumps(_rng_state()), dtype=np.uint8)
        sharded["rng"] = ShardedObject("rng_state", blob, (world.world_size,), (world.rank,), replica_id=0)
    return sharded


def _meta(run: RunConfig, state: TrainState, world: World) -> dict:
    return {
        "step": state.step,
        "consumed_samples": state.step * run.train.global_batch_size,
        "model": asdict(run.model),
        "parallel": {"tp": world.tp, "pp": world.pp, "dp": world.dp, "world_size": world.world_size},
        "tokenizer": run.data.tokenizer,
    }


def _save(run, chunks, optimizer, scheduler, state, world, log) -> None:
    started = time.perf_counter()
    path = ckpt.save_checkpoint(
        Path(run.run_dir) / "checkpoints",
        state.step,
        _sharded_state(chunks, optimizer, scheduler, state, world, with_rng=True, loading=False),
        _meta(run, state, world),
        OmegaConf.to_yaml(OmegaConf.structured(run)),
        keep=run.checkpoint.keep_last or None,
    )
    log.info(f"saved checkpoint {path} in {time.perf_counter() - started:.1f}s")


def _resume(run, chunks, optimizer, scheduler, world, log) -> TrainState:
    """Load the latest checkpoint of run_dir (full state) or checkpoint.init_from (weights only)."""
    state = TrainState()
    found = ckpt.latest_checkpoint(Path(run.run_dir) / "checkpoints") if run.checkpoint.resume else None
    if found is None and run.checkpoint.init_from:
        source = ckpt.resolve_checkpoint(run.checkpoint.init_from)
        ckpt.check_compatible(ckpt.read_meta(source), asdict(run.model), source)
        ckpt.load_model(source, chunks)
        log.info(f"initialised weights from {source}")
        return state
    if found is None:
        return state
    meta = ckpt.read_meta(found)
    ckpt.check_compatible(meta, asdict(run.model), found)
    same_layout = meta["parallel"]["world_size"] == world.world_size
    sharded = _sharded_state(chunks, optimizer, scheduler, state, world, with_rng=same_layout, loading=True)
    loaded = ckpt.load_checkpoint(found, sharded)
    ckpt.apply_model_state(chunks, loaded)
    optimizer.load_state_dict(loaded["optimizer"])
    untie_adam_steps(optimizer)
    scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        _set_rng_state(pickle.loads(loaded["rng"].tobytes()))
    state = TrainState(**loaded["train_state"])
    layout = "" if same_layout else f" (saved at tp={meta['parallel']['tp']} pp={meta['parallel']['pp']}, RNG states not restored)"
    log.info(f"resumed from {found} at step {state.step}{layout}")
    return state


def _throughput(run: RunConfig, world: World, seconds: float) -> dict:
    tokens = run.train.global_batch_size * run.train.seq_length
    record = {"tokens_per_s": tokens / seconds}
    tflops = flops_per_step(run.model, run.train.seq_length, run.train.global_batch_size) / seconds / world.world_size / 1e12
    record["tflops_per_gpu" if world.device.type == "cuda" else "tflops_per_process"] = tflops
    if world.device.type == "cuda":
        peak = PEAK_TFLOPS["fp8" if run.precision.fp8 else run.precision.params_dtype]
        record["mfu"] = tflops / peak
        record["mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        record["rss_gib"] = psutil.Process().memory_info().rss / 2**30
    return record


def _check_batch_layout(run: RunConfig, world: World) -> None:
    per_step = run.train.micro_batch_size * world.dp
    if run.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={run.train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size x data-parallel size = {per_step}; adjust one of them"
        )


def train(run: RunConfig, objective=None) -> dict:
    """Run (or resume) the training described by `run`; returns the last train and validation loss.

    `objective(run, world, log, chunks)`, when given, builds a `step.Objective` replacing the LM loss
    (distillation: pipeline/compress/distill.py); its other keys are logged with the loss.
    """
    with distributed(run.parallel, virtual_stages(run.model, run.parallel), run.device) as world:
        _check_batch_layout(run, world)
        log = MetricsLogger(run.logging, run.run_dir, world.rank, Path(run.run_dir).name, asdict(run))
        try:
            return _train(run, world, log, objective)
        finally:
            log.close()


def _train(run: RunConfig, world: World, log: MetricsLogger, make_objective=None) -> dict:
    from megatron.core import parallel_state

    run_dir = Path(run.run_dir)
    if world.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temporaries(run_dir / "checkpoints")
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(run)))
        (run_dir / DONE).unlink(missing_ok=True)
    tokenizer = load_tokenizer(run.data.tokenizer)
    run.model.check_tokenizer(tokenizer.vocab_size)
    eval_batches = run.train.eval_iters if run.train.eval_interval else 0
    datasets = build_datasets(
        run.data, run.train.seq_length, run.train.seed,
        (run.train.iters * run.train.global_batch_size, max(eval_batches, 1) * run.train.global_batch_size, 0),
        run_dir=str(run_dir), model_vocab_size=run.model.vocab_size,
    )
    train_data, valid_data = datasets[0], datasets[1]
    chunks = _ddp_wrap(
        build_model(run.model, run.parallel, run.precision, run.train.seed, world.device),
        world, run.parallel.distributed_optimizer,
    )
    optimizer = build_optimizer(chunks, run.optim, chunks[0].config, run.parallel.distributed_optimizer)
    scheduler = build_scheduler(optimizer, run.optim, run.train.iters)
    # Before _resume: building a teacher draws weights, the RNG state restored must come after.
    objective = make_objective(run, world, log, chunks) if make_objective else None
    state = _resume(run, chunks, optimizer, scheduler, world, log)
    stop = StopRequest()
    dp_rank = parallel_state.get_data_parallel_rank()

    def batches(dataset, step: int) -> list:
        return list(step_batches(
            dataset, step, run.train.global_batch_size, run.train.micro_batch_size, dp_rank, world.dp,
            tokenizer.eod, run.train.packed_documents, world.device))

    def validate() -> dict:
        results = [eval_step(chunks, batches(valid_data, i), world.device, objective) for i in range(eval_batches)]
        means = {key.replace(" ", "_"): float(np.mean([r[key] for r in results])) for key in results[0]}
        val = means.pop(next(iter(means)))
        extra = means if objective else {"ppl": float(np.exp(min(val, 50)))}
        log.log(state.step, {"loss": val, **extra}, kind="valid")
        return {"loss": val, **extra}

    log.info(f"training {run.model.name} for {run.train.iters} steps from step {state.step} "
             f"(tp={world.tp} pp={world.pp} dp={world.dp} vp={world.vp or 1}, {world.device.type})")
    last_loss, last_val = float("nan"), None
    exit_at = state.step + run.train.exit_after_steps if run.train.exit_after_steps else None
    if state.step == 0 and eval_batches:
        last_val = validate()
    while state.step < run.train.iters:
        started = time.perf_counter()
        result = train_step(chunks, optimizer, scheduler, batches(train_data, state.step), world.device, objective)
        state.step += 1
        last_loss = result.loss
        if result.skipped:
            state.skipped_steps += 1
            state.nonfinite_in_row += 1
        else:
            state.nonfinite_in_row = 0
        if state.step % run.logging.interval == 0 or result.skipped or state.step == run.train.iters:
            record = {"loss": result.loss, "lr": optimizer.param_groups[0]["lr"],
                      "grad_norm": float(result.grad_norm) if result.grad_norm is not None else float("nan"),
                      "skipped_steps": state.skipped_steps,
                      **{key.replace(" ", "_"): value for key, value in result.metrics.items()}}
            record.update(_throughput(run, world, time.perf_counter() - started))
            log.log(state.step, record)
        if state.nonfinite_in_row >= run.train.max_nonfinite_steps:
            raise RuntimeError(
                f"{state.nonfinite_in_row} steps in a row with a non-finite loss or gradient "
                f"(last loss {result.loss}); stopping. Lower optim.lr or check the data, then resume "
                f"from the last checkpoint in {run_dir / 'checkpoints'}"
            )
        if eval_batches and (state.step % run.train.eval_interval == 0 or state.step == run.train.iters):
            last_val = validate()
        stopping = (stop.agreed(world.device) or state.step == exit_at) and state.step < run.train.iters
        interval = run.checkpoint.save_interval
        if stopping or state.step == run.train.iters or (interval and state.step % interval == 0):
            _save(run, chunks, optimizer, scheduler, state, world, log)
        if stopping:
            reason = "train.exit_after_steps" if state.step == exit_at else f"signal {stop.signal or 'on another rank'}"
            log.info(f"stopping at step {state.step} ({reason}); restart with the same run_dir to resume")
            return {"step": state.step, "loss": last_loss, "val_loss": last_val and last_val["loss"],
                    "valid": last_val, "done": False}
    if world.rank == 0:
        (run_dir / DONE).write_text(f"{state.step}\n")
    return {"step": state.step, "loss": last_loss, "val_loss": last_val and last_val["loss"],
            "valid": last_val, "done": True}
