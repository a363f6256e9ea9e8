"""The pretraining loop: set up model, optimizer, data and checkpoint state, then step until done.

    from pipeline.config import load_run_config
    from pipeline.training.loop import train
    train(load_run_config(["train.iters=20"]))      # under torchrun for several processes

The run owns run_dir for its lifetime (`run_lock`); what is saved and how a resume picks its
checkpoint is in `state`; SIGTERM, SIGUSR1 and Ctrl-C save at the end of the step (docs/checkpoints.md).
"""

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from pipeline import checkpoint as ckpt
from pipeline.config import RunConfig
from pipeline.data.blend import build_datasets
from pipeline.data.phases import Phase, phase_at, wsd_decay_iters
from pipeline.data.tokenizer import load_tokenizer
from pipeline.distributed import World, distributed, use_expandable_segments
from pipeline.errors import ConfigError
from pipeline.metrics import MetricsLogger
from pipeline.model.build import release_cuda_graphs, virtual_stages
from pipeline.throughput import StartupTiming, step_throughput
from pipeline.training.batches import step_batches
from pipeline.training.kernel_cache import KernelCache
from pipeline.training.optim import build_optimizer, build_scheduler
from pipeline.training.prepare import build_training_chunks, check_machine, gather_params
from pipeline.training.run_lock import run_dir_owner
from pipeline.training.state import Saver, phases_of, pick_checkpoint, resume, warn
from pipeline.training.step import eval_step, train_step
from pipeline.training.stop import StopRequest, stop_requests

DONE = "DONE"


def _check_batch_layout(run: RunConfig, world: World) -> None:
    per_step = run.train.micro_batch_size * world.dp
    if run.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={run.train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size x data-parallel size = {per_step}; adjust one of them"
        )


@dataclass
class TrainResult:
    """Where a `train` call ended."""

    step: int
    loss: float
    """The last training step's loss (NaN when no step ran)."""
    valid: dict | None
    """The last validation record (`loss` and the objective's other terms, or `ppl`); None without one."""
    done: bool
    """True when train.iters was reached (run_dir/DONE written); False when stopped early to resume."""

    @property
    def val_loss(self) -> float | None:
        return self.valid["loss"] if self.valid else None


def train(run: RunConfig, objective=None) -> TrainResult:
    """Run (or resume) the training described by `run`; where it ended (`TrainResult`).

    `objective(run, world, log, chunks)`, when given, builds a `step.Objective` replacing the LM loss
    (distillation: pipeline/compress/distill.py); its other keys are logged with the loss.
    """
    entered = time.time()  # a later run of this process times its start-up from here (StartupTiming)
    if objective is not None and run.parallel.cp > 1:
        # An objective's loss function sees this rank's part of each sequence only (step._loss_func
        # is the one that averages over the context-parallel group).
        raise ConfigError(f"parallel.cp={run.parallel.cp} is for pretraining: a training objective such as "
                          f"distillation needs parallel.cp=1")
    if run.train.expandable_segments and torch.cuda.is_available():
        use_expandable_segments()
    with distributed(run.parallel, virtual_stages(run.model, run.parallel), run.device) as world:
        _check_batch_layout(run, world)
        # Before the run directory is touched (build_model checks again, too late for that).
        check_machine(run.precision, run.train, run.parallel, world.device)
        with run_dir_owner(run.run_dir, world.rank):
            log = MetricsLogger(run.logging, run.run_dir, world.rank, Path(run.run_dir).name, asdict(run))
            try:
                with stop_requests(announce=world.rank == 0) as stop, Saver(run, world, log) as saver:
                    return _train(run, world, log, stop, saver, objective, entered)
            finally:
                if run.train.cuda_graphs:
                    release_cuda_graphs()
                log.close()


def _train(run: RunConfig, world: World, log: MetricsLogger, stop: StopRequest, saver: Saver,
           make_objective, entered: float) -> TrainResult:
    from megatron.core import parallel_state

    run_dir = Path(run.run_dir)
    found = pick_checkpoint(run, world)  # first: a checkpoint that cannot be resumed leaves run_dir as it was
    tokenizer = load_tokenizer(run.data.tokenizer)
    run.model.check_tokenizer(tokenizer.vocab_size)
    eval_batches = run.train.eval_iters if run.train.eval_interval else 0
    eval_windows = eval_batches * run.train.global_batch_size
    phases = phases_of(run)
    # Every phase's datasets now, so that a missing or damaged dataset of a later phase fails at the start.
    phase_data = [_phase_datasets(run, phase, eval_batches) for phase in phases]
    chunks = build_training_chunks(run.model, run.parallel, run.precision, run.train, world.device)
    kernels = KernelCache.open(run.train.kernel_cache or run_dir / "kernel_cache", lambda m: warn(world, m))
    if kernels.primed:
        log.info(f"kernel cache {kernels.directory}: {kernels.primed} autotune choices reused")
    optimizer = build_optimizer(chunks, run.optim, chunks[0].config, run.parallel.distributed_optimizer)
    decay = wsd_decay_iters(phases, run.train.iters)
    scheduler = build_scheduler(optimizer, replace(run.optim, wsd_decay_iters=decay) if decay else run.optim,
                                run.train.iters)
    # Before resume: building a teacher draws weights, the RNG state restored must come after.
    objective = make_objective(run, world, log, chunks) if make_objective else None
    state = resume(run, found, chunks, optimizer, scheduler, world, log)
    # Only now, all checked and loaded: a refused start leaves a finished run finished.
    if world.rank == 0:
        ckpt.remove_stale_temporaries(run_dir / "checkpoints")
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(run)))
        (run_dir / DONE).unlink(missing_ok=True)
    dp_rank = parallel_state.get_data_parallel_rank()
    documents_per_sequence = run.train.cuda_graph_documents if run.train.cuda_graphs else None
    joined_documents = 0

    def batches(dataset, step: int) -> list:
        return list(step_batches(
            dataset, step, run.train.global_batch_size, run.train.micro_batch_size, dp_rank, world.dp,
            tokenizer.eod, run.train.packed_documents, world.device, documents_per_sequence, world.cp,
            world.cp_rank))

    def validate() -> dict:
        phase = phase_at(phases, max(state.step - 1, 0))  # the phase just trained (the first before step 1)
        valid_data = phase_data[phase.index][1]
        gather_params(chunks)
        results = [eval_step(chunks, batches(valid_data, i), world.device, objective) for i in range(eval_batches)]
        means = {key.replace(" ", "_"): float(np.mean([r[key] for r in results])) for key in results[0]}
        val = means.pop(next(iter(means)))
        extra = means if objective else {"ppl": float(np.exp(min(val, 50)))}
        record = {"loss": val, **extra}
        log.log(state.step, {**record, "windows": eval_windows, "tokens": eval_windows * phase.seq_length,
                             **_phase_field(phase)}, kind="valid")
        if world.rank == 0:
            kernels.save()
        return record

    log.info(f"training {run.model.name} for {run.train.iters} steps from step {state.step} "
             f"(tp={world.tp} pp={world.pp} cp={world.cp} dp={world.dp} vp={world.vp or 1}, {world.device.type})")
    last_loss, last_val = float("nan"), None
    exit_at = state.step + run.train.exit_after_steps if run.train.exit_after_steps else None
    if state.step == 0 and eval_batches:
        last_val = validate()
    timing = StartupTiming(log, entered)
    phase = phase_at(phases, state.step)
    if phase.name and state.step < run.train.iters and state.step > phase.start:
        log.info(f"continuing phase {_describe(phase, len(phases))}")
    while state.step < run.train.iters:
        started = time.perf_counter()
        phase = phase_at(phases, state.step)
        if phase.name and state.step == phase.start:
            log.info(f"starting phase {_describe(phase, len(phases))}")
            log.log(state.step, {"phase": phase.name, "index": phase.index, "seq_length": phase.seq_length},
                    kind="phase")
        micro_batches = batches(phase_data[phase.index][0], state.step - phase.start)
        joined_documents += sum(m.joined_documents for m in micro_batches)
        result = train_step(chunks, optimizer, scheduler, micro_batches, world.device, objective)
        state.step += 1
        last_loss = result.loss
        if timing.step_done(time.perf_counter() - started, state.step) == 1 and world.rank == 0:
            kernels.save()
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
            if documents_per_sequence and run.train.packed_documents:
                record["joined_documents"] = joined_documents
            record.update(step_throughput(run.model, phase.seq_length, run.train.global_batch_size,
                                          world.world_size, world.device, time.perf_counter() - started))
            record.update(_phase_field(phase))
            log.log(state.step, record)
        if state.nonfinite_in_row >= run.train.max_nonfinite_steps:
            raise RuntimeError(
                f"{state.nonfinite_in_row} steps in a row with a non-finite loss or gradient "
                f"(last loss {result.loss}); stopping. Lower optim.lr or check the data, then resume "
                f"from the last checkpoint in {run_dir / 'checkpoints'}"
            )
        if eval_batches and (state.step % run.train.eval_interval == 0 or state.step in (phase.end, run.train.iters)):
            last_val = validate()
        stopping = (stop.agreed(world.device) or state.step == exit_at) and state.step < run.train.iters
        saver.poll(state.step)
        interval = run.checkpoint.save_interval
        at_end = state.step == run.train.iters and run.checkpoint.save_at_end
        if stopping or at_end or (interval and state.step % interval == 0):
            saver.save(chunks, optimizer, scheduler, state)
        if stopping:
            saver.wait()
            reason = "train.exit_after_steps" if state.step == exit_at else stop.name()
            log.info(f"stopping at step {state.step} ({reason}); restart with the same run_dir to resume")
            return TrainResult(state.step, last_loss, last_val, done=False)
    saver.wait()
    if world.rank == 0:
        (run_dir / DONE).write_text(f"{state.step}\n")
    return TrainResult(state.step, last_loss, last_val, done=True)


def _phase_datasets(run: RunConfig, phase: Phase, eval_batches: int) -> tuple:
    """(train, valid) megatron datasets of one phase: its own blend, sequence length and seed
    (train.seed + phase index), train holding exactly the phase's samples."""
    batch = run.train.global_batch_size
    data = replace(run.data, paths=list(phase.paths), weights=list(phase.weights), phases=[])
    datasets = build_datasets(
        data, phase.seq_length, run.train.seed + phase.index,
        ((phase.end - phase.start) * batch, max(eval_batches, 1) * batch, 0),
        run_dir=run.run_dir, model_vocab_size=run.model.vocab_size,
    )
    return datasets[0], datasets[1]


def _phase_field(phase: Phase) -> dict:
    """The metrics key naming the phase of a record (none for a run without data.phases)."""
    return {"phase": phase.name} if phase.name else {}


def _describe(phase: Phase, count: int) -> str:
    blend = ", ".join(f"{path} x{weight:g}" for path, weight in zip(phase.paths, phase.weights))
    return (f"{phase.name} ({phase.index + 1}/{count}): steps {phase.start}-{phase.end - 1}, seq_length "
            f"{phase.seq_length}, blend {blend}")
