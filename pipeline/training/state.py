"""What a training run saves and restores: model, optimizer, schedule, loop counters and RNG states.

    found = pick_checkpoint(run, world)                                   # before writing to run_dir
    state = resume(run, found, chunks, optimizer, scheduler, world, log)  # fresh run: TrainState()
    with Saver(run, world, log) as saver:
        saver.save(chunks, optimizer, scheduler, state)                   # every save_interval
        saver.poll(state.step)                                            # every step
        saver.wait()                                                      # before DONE

`pick_checkpoint` chooses the newest intact checkpoint of run_dir (`checkpoint.find_resumable`:
damaged ones are skipped with a warning naming them); `resume` loads it or, for a fresh run dir,
the weights of `checkpoint.init_from`. `Saver` writes checkpoints, in the background with
checkpoint.async_save: at most one in flight, committed once written on every rank, and always
before the run ends (docs/checkpoints.md). Nothing here is pickled: the loop counters are plain ints and
the RNG states tensors plus JSON, so the stored objects load with `torch.load(weights_only=True)`.
"""

import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from pipeline import checkpoint as ckpt
from pipeline.config import RunConfig
from pipeline.data.phases import Phase, check_started_phases_unchanged, resolve_phases
from pipeline.distributed import World
from pipeline.errors import CheckpointError
from pipeline.training.prepare import gather_params

SCHEDULE_GROUP_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")
"""Values megatron-core copies from the config into every optimizer param group (and saves with it)."""
SCHEDULE_FIELDS = {
    "max_lr": "optim.lr", "min_lr": "optim.min_lr", "lr_warmup_steps": "optim.warmup_iters",
    "lr_decay_steps": "train.iters", "lr_decay_style": "optim.schedule",
}
"""Scheduler state -> the config field it comes from, for the message when they changed."""


@dataclass
class TrainState:
    """Loop counters saved with every checkpoint."""

    step: int = 0
    skipped_steps: int = 0
    nonfinite_in_row: int = 0


def warn(world: World, message: str) -> None:
    """A warning the user must see: one line on rank 0's stderr."""
    if world.rank == 0:
        print(message, file=sys.stderr, flush=True)


def rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors (Python's and NumPy's as JSON bytes)."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    plain = {"python": [version, list(keys), gauss], "numpy": [name, np_keys.tolist(), pos, has_gauss, cached]}
    state = {"json": torch.frombuffer(bytearray(json.dumps(plain).encode()), dtype=torch.uint8),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore what `rng_state` returned."""
    plain = json.loads(bytes(state["json"].tolist()).decode())
    version, keys, gauss = plain["python"]
    random.setstate((version, tuple(keys), gauss))
    name, np_keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(np_keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def sharded_state(chunks, optimizer, scheduler, state: TrainState, world: World, with_rng: bool, loading: bool) -> dict:
    """The full training state as megatron-core sharded objects (the same structure to save and load)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model_state = ckpt.model_sharded_state(chunks)
    sharded = dict(model_state)
    sharded["optimizer"] = ckpt.optimizer_sharded_state(optimizer, model_state, loading)
    sharded["scheduler"] = scheduler.state_dict()
    sharded["train_state"] = asdict(state)
    if with_rng:
        sharded["rng"] = ShardedObject("rng_state", rng_state(), (world.world_size,), (world.rank,), replica_id=0)
    return sharded


def phases_of(run: RunConfig) -> list[Phase]:
    """The run's data phases, resolved (one implicit phase without data.phases)."""
    return resolve_phases(run.data.phases, run.data.paths, run.data.weights, run.train.seq_length, run.train.iters)


def checkpoint_meta(run: RunConfig, state: TrainState, world: World) -> ckpt.CheckpointMeta:
    """The meta.json of a training checkpoint at `state.step`."""
    return ckpt.CheckpointMeta(
        step=state.step,
        consumed_samples=state.step * run.train.global_batch_size,
        model=asdict(run.model),
        parallel={"tp": world.tp, "pp": world.pp, "cp": world.cp, "dp": world.dp, "world_size": world.world_size},
        tokenizer=run.data.tokenizer,
        phases=[phase.record() for phase in phases_of(run)],
    )


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


class Saver:
    """Saves everything `resume` restores (all ranks) and logs what each save cost once committed:
    a line on the console and a `kind: checkpoint` record in the metrics (saved_step, stall_s,
    waited_s, write_s, gb, gb_per_s)."""

    def __init__(self, run: RunConfig, world: World, log):
        self._run, self._world, self._log = run, world, log
        self._step = 0
        self._writer = ckpt.CheckpointWriter(
            Path(run.run_dir) / "checkpoints", keep=run.checkpoint.keep_last or None,
            background=run.checkpoint.async_save, on_commit=self._report,
        )

    def save(self, chunks, optimizer, scheduler, state: TrainState) -> None:
        """Save the state at `state.step` (in the background: returns once it is staged)."""
        self._step = state.step
        started = time.perf_counter()
        gather_params(chunks)
        full = sharded_state(chunks, optimizer, scheduler, state, self._world, with_rng=True, loading=False)
        meta = checkpoint_meta(self._run, state, self._world)
        run_config = OmegaConf.to_yaml(OmegaConf.structured(self._run))
        self._writer.save(state.step, full, meta, run_config, prepared_s=time.perf_counter() - started)

    def poll(self, step: int) -> None:
        """Commit the save in flight if it is written on every rank (call every step)."""
        self._step = step
        self._writer.poll()

    def wait(self) -> None:
        """Wait for the save in flight and commit it."""
        self._writer.wait()

    def _report(self, report: ckpt.SaveReport) -> None:
        gb = report.bytes / 1e9
        rate = gb / report.write_s if report.write_s > 0 else 0.0
        waited = f" ({report.waited_s:.1f} s of it waiting for the write)" if report.waited_s >= 0.05 else ""
        where = " in the background" if report.background else ""
        self._log.info(f"saved checkpoint {report.path}: stall {report.stall_s:.1f} s{waited}; {_size(report.bytes)} "
                       f"written in {report.write_s:.1f} s ({rate:.2f} GB/s){where}")
        # Logged at the step it was committed: trackers drop records of steps older than their last.
        self._log.log(self._step, {"saved_step": report.step, "stall_s": report.stall_s, "waited_s": report.waited_s,
                                   "write_s": report.write_s, "gb": gb, "gb_per_s": rate}, kind="checkpoint")

    def __enter__(self) -> "Saver":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        """Leaving commits the save in flight: normally, and after an exception if every rank had one
        (otherwise a warning says it was not committed); a second Ctrl-C kills the writer at once."""
        try:
            if kind is None:
                self._writer.wait()
            elif not issubclass(kind, Exception):
                self._writer.abort()
            else:
                try:
                    self._writer.settle_after_error()
                except Exception as e:  # noqa: BLE001 - the exception that ends the run is the one to show
                    print(f"WARNING: {e}", file=sys.stderr, flush=True)
        finally:
            self._writer.close()


def pick_checkpoint(run: RunConfig, world: World) -> Path | None:
    """The checkpoint of run_dir to resume, or None for a fresh start (all ranks; rank 0 verifies it and
    warns about damaged ones). CheckpointError if it cannot be resumed (weights only, all damaged,
    another model shape): called before the run touches run_dir, so a refusal leaves it as it was."""
    choice = [None]
    if world.rank == 0 and run.checkpoint.resume:
        try:
            found = ckpt.find_resumable(Path(run.run_dir) / "checkpoints", lambda m: warn(world, m))
            if found is not None and ckpt.read_meta(found).weights_only:
                raise CheckpointError(
                    f"{found} holds weights only (an import) and cannot be resumed; train from it in a new "
                    f"run_dir with checkpoint.init_from={Path(run.run_dir)}"
                )
            if found is not None:
                meta = ckpt.read_meta(found)
                ckpt.check_compatible(meta, asdict(run.model), found)
                _check_phases(run, meta)
            choice = [str(found) if found else None]
        except CheckpointError as e:
            choice = [e]
    if world.world_size > 1:
        dist.broadcast_object_list(choice, src=0)
    if isinstance(choice[0], CheckpointError):
        raise choice[0]
    return Path(choice[0]) if choice[0] else None


def _check_phases(run: RunConfig, meta: ckpt.CheckpointMeta) -> None:
    """With data.phases, refuse to resume with a phase changed that the checkpoint has started (its data
    order would no longer be the one trained); without, the blend may change as it always could."""
    if run.data.phases and meta.phases is not None:
        why = check_started_phases_unchanged(meta.phases, phases_of(run), meta.step)
        if why:
            raise CheckpointError(why)


def _adopt_configured_schedule(saved_optimizer: dict, optimizer) -> None:
    """Give the saved param groups the configured lr/min_lr/wd, so that a changed optim.lr resumes.

    megatron-core pairs saved and current param groups by a tuple that includes max_lr and min_lr
    (optimizer.param_group_identifier_keys): with another optim.lr the lookup raises KeyError.
    """
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    def structural(group: dict) -> tuple:
        return tuple(group.get(k) for k in param_group_identifier_keys if k not in SCHEDULE_GROUP_KEYS)

    current = {}
    for group in optimizer.param_groups:
        current.setdefault(structural(group), {k: group[k] for k in SCHEDULE_GROUP_KEYS if k in group})

    def walk(node) -> None:
        if isinstance(node, dict):
            for group in node.get("param_groups", []) if isinstance(node.get("param_groups"), list) else []:
                group.update(current.get(structural(group), {}))
            for value in node.values():
                walk(value)

    walk(saved_optimizer)


def _schedule_changes(saved: dict, scheduler) -> list[str]:
    return [
        f"{field} {saved[key]} -> {getattr(scheduler, key)}"
        for key, field in SCHEDULE_FIELDS.items()
        if key in saved and saved[key] != getattr(scheduler, key)
    ]


def _init_from(run: RunConfig, chunks, optimizer, log) -> None:
    source = ckpt.resolve_checkpoint(run.checkpoint.init_from)
    ckpt.check_compatible(ckpt.read_meta(source), asdict(run.model), source)
    ckpt.load_model(source, chunks)  # verifies the checkpoint first (rank 0 for all)
    # With bf16 weights the optimizer updates fp32 main copies made from the random initial weights and
    # copies them back at its first step: they must be refreshed from the loaded ones.
    optimizer.reload_model_params()
    log.info(f"initialised weights from {source}")


def resume(run: RunConfig, found: Path | None, chunks, optimizer, scheduler, world: World, log) -> TrainState:
    """Load checkpoint `found` (from `pick_checkpoint`: full state) or, without one, the weights of
    checkpoint.init_from; the loop counters to continue from."""
    if found is None:
        if run.checkpoint.init_from:
            _init_from(run, chunks, optimizer, log)
        return TrainState()
    meta = ckpt.read_meta(found)
    same_layout = meta.parallel.get("world_size") == world.world_size
    # Format-1 checkpoints pickled their RNG states, which safe loading refuses: resume without them.
    with_rng = same_layout and meta.format >= 2
    sharded = sharded_state(chunks, optimizer, scheduler, TrainState(), world, with_rng=with_rng, loading=True)
    loaded = ckpt.load_checkpoint(found, sharded)
    ckpt.apply_model_state(chunks, loaded)
    _adopt_configured_schedule(loaded["optimizer"], optimizer)
    ckpt.load_optimizer_state(optimizer, loaded["optimizer"])
    changes = _schedule_changes(loaded["scheduler"], scheduler)
    scheduler.load_state_dict(loaded["scheduler"])
    if with_rng:
        set_rng_state(loaded["rng"])
    state = TrainState(**loaded["train_state"])
    if not same_layout:
        saved = meta.parallel
        note = (f" (saved at tp={saved.get('tp')} pp={saved.get('pp')} cp={saved.get('cp', 1)}, "
                f"RNG states not restored)")
    else:
        note = "" if with_rng else f" (a format-{meta.format} checkpoint: RNG states not restored)"
    log.info(f"resumed from {found} at step {state.step}{note}")
    if changes:
        log.info(f"learning-rate schedule changed since the checkpoint ({', '.join(changes)}): continuing with the "
                 f"configured one")
    return state
