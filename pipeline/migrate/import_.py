"""Import a Megatron-LM, NeMo 2 or Megatron-Bridge checkpoint as a pipeline checkpoint.

    python pipeline/convert.py import-megatron SRC OUT_DIR [--source-kind K] [--weights-only | --with-optimizer]
        [parallel.tp=2 ...]

writes
    OUT_DIR/checkpoints/step_N/   N = the source's iteration; meta.json records the source
    OUT_DIR/model/NAME.yaml       the model config, a Hydra `model` option
    OUT_DIR/tokenizer/            the tokenizer files a Bridge (tokenizer/) or NeMo 2 (context/nemo_tokenizer/)
                                  checkpoint carries

With the optimizer state (no --weights-only, and a distributed-optimizer state that loads at the
requested layout: `Source.optimizer_refused`) OUT_DIR is a run directory that training resumes like
one of its own, at any layout:
    python -m pipeline.train hydra.searchpath=[file://OUT_DIR] model=NAME run_dir=OUT_DIR
otherwise it holds weights only, to start from:
    python -m pipeline.train hydra.searchpath=[file://OUT_DIR] model=NAME checkpoint.init_from=OUT_DIR

The pipeline's checkpoints use megatron-core's sharded keys, as the sources do (NeMo 2 adds
`module.`), so each rank builds its part of the model (and optimizer) at the requested TP/PP, asks
`dist_checkpointing.load` for the source's keys, and saves (fully_reshardable). The optimizer
state is loaded in the source's format: fully_reshardable as it is; fully_sharded_model_space
through pipeline/migrate/model_space.py; dp_reshardable into buckets built with the source's DDP
settings, checked against the stored ones (`check_buckets`, `check_bucket_params`). The scheduler
continues at the source's iteration counted in steps (Megatron-LM counts samples); the data position
is the step, as in the pipeline's own runs; RNG states are not carried over.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import (
    EXIT_USER_ERROR,
    CheckpointError,
    ConversionError,
    PipelineError,
    UnsafeCheckpointError,
    find_cause,
)
from pipeline.fs import replace_dir, temporary_sibling
from pipeline.migrate.source import BUCKETS, Source, open_source
from pipeline.model.config import ModelConfig, write_model_option
from pipeline.processes import skip_final_collection


@dataclass(frozen=True)
class MigrationResult:
    """What an import wrote, and how to continue from it."""

    out_dir: Path
    checkpoint: Path
    model: ModelConfig
    source: Source
    with_optimizer: bool
    notes: list[str]


def import_run_config(source: Source, overrides: list[str], out_dir: Path):
    """The RunConfig the import builds and saves with: the overrides (parallel.*, precision, optim.*,
    train.*) with the source's model and, unless overridden, its precision."""
    from pipeline.config import load_run_config

    if any(o.lstrip("+~").startswith("model") for o in overrides):
        raise ConversionError("model.* overrides are not allowed: the model comes from the source checkpoint")
    precision = [] if any(o.startswith("precision=") for o in overrides) else [f"precision={source.precision}"]
    run = load_run_config([*precision, *overrides])
    if source.model.padded_vocab_size % run.parallel.tp:
        raise ConversionError(f"parallel.tp={run.parallel.tp} does not divide the source's {source.model.vocab_size} "
                              f"embedding rows; use a parallel.tp that divides it")
    train = dataclasses.replace(run.train, seq_length=min(run.train.seq_length, source.model.seq_length))
    return dataclasses.replace(run, model=source.model, train=train, run_dir=str(out_dir))


def source_keys(sharded_state: dict, prefix: str, renamed: dict[str, str]) -> dict:
    """`sharded_state` with every sharded key as the source stored it (in place): `prefix` before the
    model key (also inside the optimizer's `optimizer.state.<kind>.<model key>`), aliases applied."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    for value in nested_values(sharded_state):
        if not hasattr(value, "key"):
            continue
        head = ""
        if value.key.startswith("optimizer.state."):
            kind, _, key = value.key[len("optimizer.state."):].partition(".")
            head = f"optimizer.state.{kind}."
        elif BUCKETS.match(value.key):  # dp_reshardable buckets: no model key in them
            continue
        else:
            key = value.key
        value.key = head + prefix + renamed.get(key, key)
    return sharded_state


def load_source(source: Source, sharded_state: dict) -> dict:
    """`dist_checkpointing.load` of the source's keys (pickles through the allow-list)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    from pipeline.checkpoint import safe_checkpoint_loading
    from pipeline.checkpoint.load import drop_missing_extra_state
    from pipeline.migrate.source import tensor_shapes

    shapes = tensor_shapes(source.ckpt_dir)
    sharded_state = drop_missing_extra_state(source_keys(sharded_state, source.prefix, source.renamed), set(shapes))
    try:
        with safe_checkpoint_loading():
            if source.optimizer_format == "fully_sharded_model_space" and "optimizer" in sharded_state:
                from pipeline.migrate.model_space import load_model_space

                return load_model_space(sharded_state, str(source.ckpt_dir), shapes)
            return dist_checkpointing.load(sharded_state, str(source.ckpt_dir))
    except (Exception, CheckpointException) as exc:  # torch's CheckpointException is a BaseException
        unsafe = find_cause(exc, lambda e: isinstance(e, UnsafeCheckpointError))
        if unsafe is not None:
            raise unsafe from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise CheckpointError(f"cannot load {source.ckpt_dir}: {type(exc).__name__}: {first}") from exc


def check_buckets(source: Source, optimizer_state: dict) -> None:
    """The distributed optimizer's buckets built here are those the source's dp_reshardable state
    was saved from: the same bucket tensors with the same sizes (megatron's loader would stop at an
    assertion, or at a shape mismatch, instead)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from pipeline.migrate.source import tensor_shapes

    stored = {k: v[0] for k, v in tensor_shapes(source.ckpt_dir).items() if BUCKETS.match(k)}
    built = {v.key: tuple(v.global_shape) for v in nested_values(optimizer_state)
             if isinstance(v, ShardedTensor) and BUCKETS.match(v.key)}

    def size(shape) -> str:
        return "no such bucket" if shape is None else f"{shape[0]} elements"

    # This rank's buckets (its model-parallel rank's, `dp_group_idx_N`), and none of its stored ones missing.
    groups = {key.partition(".gbuf_idx_")[0] for key in built}
    for key in sorted(set(built) | {k for k in stored if k.partition(".gbuf_idx_")[0] in groups}):
        if stored.get(key) != built.get(key):
            raise ConversionError(
                f"{source.ckpt_dir}: dp_reshardable optimizer bucket {key}: the source's has {size(stored.get(key))}, "
                f"this import's {size(built.get(key))}: its DDP buckets were laid out otherwise (bucket size, "
                f"parameters, padding); import it with --weights-only")


def unalias_bucket_params(optimizer_state: dict) -> None:
    """Give the dp_reshardable template's main-parameter entries memory of their own: with fp32
    weights they are views of the parameters, which the model's weights (loaded by name) would
    overwrite or be overwritten by, and `check_bucket_params` compares the two."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    for sh in nested_values(optimizer_state):
        if isinstance(sh, ShardedTensor) and BUCKETS.match(sh.key) and sh.key.endswith(".param"):
            sh.data = sh.data.clone()


def check_bucket_params(source: Source, optimizer, saved: dict) -> None:
    """A loaded dp_reshardable state's main parameters, placed by bucket position as megatron's loader
    places them, are the weights the checkpoint stores under the parameters' names (already loaded
    into the model). Buckets that hold the parameters in another order would put one parameter's
    Adam state on another; this finds it."""
    import torch

    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [saved] if len(subs) == 1 else [saved[i] for i in range(len(subs))]
    for sub, state in zip(subs, states, strict=True):
        for gbuf_idx, ranges in enumerate(sub.gbuf_ranges):
            for dtype, buckets in ranges.items():
                for bucket_idx, bucket in enumerate(buckets):
                    entries = [e for e in state["param_state"][gbuf_idx][dtype][bucket_idx] if not e["padding"]]
                    for entry, (param, where) in zip(entries, bucket["param_map"].items(), strict=True):
                        weight = param.detach().view(-1)[where["param"].start:where["param"].end]
                        if not torch.equal(entry["param"].to(weight.dtype), weight):
                            raise ConversionError(
                                f"{source.ckpt_dir}: the dp_reshardable optimizer state does not line up with the "
                                f"weights (the source's buckets hold its parameters in another order); import it "
                                f"with --weights-only")


def save_imported(run, source: Source, tmp_root: Path, with_optimizer: bool, tokenizer: str | None) -> None:
    """All ranks: build the model (and optimizer) at run.parallel, load the source into them and save
    checkpoint step_<iteration> under tmp_root/checkpoints (its meta.json names `tokenizer`)."""
    from omegaconf import OmegaConf

    from pipeline import checkpoint as ckpt
    from pipeline.distributed import distributed
    from pipeline.model.build import build_model, virtual_stages
    from pipeline.training.optim import build_optimizer, build_scheduler
    from pipeline.training.prepare import build_training_chunks, gather_params
    from pipeline.training.state import TrainState, _adopt_configured_schedule, checkpoint_meta, sharded_state

    run_yaml = OmegaConf.to_yaml(OmegaConf.structured(run))
    with distributed(run.parallel, virtual_stages(run.model, run.parallel), run.device) as world:
        state = TrainState(step=source.iteration)
        meta = dataclasses.replace(
            # The source's tokenizer, if it carries one; never the pipeline's default data.tokenizer.
            checkpoint_meta(run, state, world), tokenizer=tokenizer, weights_only=not with_optimizer,
            source=str(source.path.resolve()), imported_from=source.record(),
        )
        if not with_optimizer:
            chunks = build_model(run.model, run.parallel, run.precision, run.train.seed, world.device)
            ckpt.apply_model_state(chunks, load_source(source, ckpt.model_sharded_state(chunks)))
            ckpt.save_checkpoint(tmp_root / "checkpoints", source.iteration, ckpt.model_sharded_state(chunks),
                                 meta, run_yaml)
            return
        buckets = source.optimizer_format == "dp_reshardable"
        # A dp_reshardable state is the source's DDP buckets: build them with its bucket settings (the
        # checkpoint written here is fully_reshardable, whatever they were).
        parallel = dataclasses.replace(run.parallel, **source.ddp) if buckets else run.parallel
        chunks = build_training_chunks(run.model, parallel, run.precision, run.train, world.device)
        optimizer = build_optimizer(chunks, run.optim, chunks[0].config, run.parallel.distributed_optimizer)
        scheduler = build_scheduler(optimizer, run.optim, run.train.iters)
        model_state = ckpt.model_sharded_state(chunks)
        # A model-space source is read into the fully_reshardable layout (pipeline/migrate/model_space.py).
        metadata = dict(source.optimizer_metadata)
        if buckets:
            metadata["distrib_optim_sharding_type"] = "dp_reshardable"
        wanted = {**model_state, "optimizer": ckpt.optimizer_sharded_state(
            optimizer, model_state, loading=True, metadata=metadata)}
        if buckets:
            check_buckets(source, wanted["optimizer"])
            unalias_bucket_params(wanted["optimizer"])
        loaded = load_source(source, wanted)
        ckpt.apply_model_state(chunks, loaded)
        if buckets:
            check_bucket_params(source, optimizer, loaded["optimizer"])
        _adopt_configured_schedule(loaded["optimizer"], optimizer)
        ckpt.load_optimizer_state(optimizer, loaded["optimizer"])
        # The schedule continues where the source's left off, in steps (Megatron-LM counts samples).
        scheduler.step(increment=source.iteration)
        gather_params(chunks)
        full = sharded_state(chunks, optimizer, scheduler, state, world, with_rng=True, loading=False)
        ckpt.save_checkpoint(tmp_root / "checkpoints", source.iteration, full, meta, run_yaml)


def import_megatron(
    src: str | Path,
    out_dir: str | Path,
    overrides: list[str] = (),
    source_kind: str | None = None,
    weights_only: bool = False,
    overwrite: bool = False,
    name: str | None = None,
    with_optimizer: bool = False,
) -> MigrationResult:
    """Import SRC into OUT_DIR (module docstring). The optimizer state comes along where it can
    (`Source.optimizer_refused`), else the weights alone with a note; `weights_only` leaves it behind,
    `with_optimizer` refuses to do without it. Every check runs before anything is written; on
    failure OUT_DIR is untouched."""
    from pipeline.hf.export import check_out_dir
    from pipeline.hf.import_ import copy_tokenizer, default_name, launch_import_workers

    src = Path(src)
    source = open_source(src, source_kind, name or default_name(src if src.name != "weights" else src.parent))
    out_dir = check_out_dir(Path(out_dir), overwrite, src)
    run = import_run_config(source, list(overrides), out_dir)
    notes = []
    if weights_only and with_optimizer:
        raise ConversionError("--weights-only and --with-optimizer contradict each other; give one of them")
    refused = None if weights_only else source.optimizer_refused(run.parallel)
    if refused and with_optimizer:
        raise ConversionError(f"--with-optimizer: {src} has {refused}; import it at that layout, or without "
                              f"--with-optimizer for the weights only")
    if refused:
        notes.append(f"{src} has {refused}: imported the weights only; start from them with checkpoint.init_from")
    with_optimizer = not weights_only and refused is None
    if with_optimizer and source.training:
        # The import saves with the pipeline's defaults; the resumed run takes optim.* and train.* from
        # its own command line, so say what continues the source's optimisation.
        notes.append("the source trained with " + " ".join(f"{k}={v}" for k, v in source.training.items())
                     + "; give the same overrides to continue its optimisation")
    tmp = temporary_sibling(out_dir)
    try:
        tokenizer = None
        if source.tokenizer_dir is not None:
            usable, tok_notes = copy_tokenizer(source.tokenizer_dir, tmp / "tokenizer", source.model)
            tokenizer, notes = (str(out_dir / "tokenizer") if usable else None), notes + tok_notes
        else:
            notes.append(f"{src} carries no tokenizer files; give the run's tokenizer at training time "
                         f"(data.tokenizer)")
        nproc = run.parallel.tp * run.parallel.pp
        if nproc == 1:
            save_imported(run, source, tmp, with_optimizer, tokenizer)
        else:
            launch_import_workers("pipeline.migrate.import_", nproc,
                                  [str(src), str(tmp), str(out_dir), source.kind, source.model.name,
                                   "1" if with_optimizer else "0", tokenizer or "-", *overrides])
        write_model_option(source.model, tmp, f"Imported from {source.kind} checkpoint {source.path.resolve()} "
                                              f"(iteration {source.iteration}) by pipeline/convert.py import-megatron.")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    from pipeline.checkpoint import latest_checkpoint

    return MigrationResult(out_dir=out_dir, checkpoint=latest_checkpoint(out_dir / "checkpoints"), model=source.model,
                           source=source, with_optimizer=with_optimizer, notes=notes)


def main(argv: list[str]) -> None:
    """torchrun worker: SRC TMP_ROOT FINAL_ROOT KIND NAME WITH_OPTIMIZER TOKENIZER|- [overrides...] (from
    `import_megatron`)."""
    src, tmp_root, final_root, kind, name, with_optimizer, tokenizer, *overrides = argv
    try:
        source = open_source(Path(src), kind, name)
        run = import_run_config(source, overrides, Path(final_root))
        save_imported(run, source, Path(tmp_root), with_optimizer == "1", None if tokenizer == "-" else tokenizer)
    except PipelineError as error:  # one line for `launch_import_workers` to pass on
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    finally:
        skip_final_collection()
