"""The parent of a compression run: its checkpoint opened and checked, and its identity.

Every step starts here, so a missing, incomplete or mismatched parent fails before any work.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from pipeline import checkpoint as ckpt
from pipeline.compress.scores import ParentIdentity
from pipeline.errors import CheckpointError, ConfigError
from pipeline.model import params
from pipeline.model.config import ModelConfig


def parent_identity(step_dir: Path, meta: ckpt.CheckpointMeta) -> ParentIdentity:
    """The identity scores and plans record for a parent checkpoint step directory."""
    return ParentIdentity(checkpoint=str(Path(step_dir).resolve()), step=int(meta.step), model=meta.model)


def open_parent(parent_dir: str | Path):
    """(step dir, meta, ModelConfig, CheckpointTensors) of a parent checkpoint, verified
    (`verify_checkpoint`) and checked complete: every tensor its model config implies is stored with
    that shape. CheckpointError otherwise."""
    step_dir = ckpt.resolve_checkpoint(parent_dir)
    tensors = ckpt.CheckpointTensors(step_dir)
    meta = tensors.meta
    try:
        model = ModelConfig(**meta.model)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"parent {step_dir} has no usable model config in its meta.json ({e}); re-save it") from e
    for key, shape in params.checkpoint_shapes(model).items():
        found = tensors.shapes.get(key)
        if found != shape:
            what = "lacks tensor" if found is None else f"stores {list(found)} for"
            raise CheckpointError(
                f"parent checkpoint {step_dir} {what} {key} (expected {list(shape)}); it is incomplete or "
                f"not of model {model.name}: give a complete checkpoint"
            )
    return step_dir, meta, model, tensors


@dataclass(frozen=True)
class ParentRun:
    """A compression run set up for its parent (`parent_run`)."""

    run: object
    """The RunConfig with the parent's model and a sequence length the parent supports."""
    step_dir: Path
    """The parent's checkpoint step directory, checked complete."""
    identity: ParentIdentity
    """What scores and plans record of the parent."""


def check_run_dir(run, step_dir: Path) -> None:
    """ConfigError for a run_dir that is, holds or sits inside the parent's run directory: compressing
    there would overwrite the parent's checkpoints, metrics and DONE."""
    parent_dir = ckpt.run_dir_of(step_dir).resolve()
    run_dir = Path(run.run_dir).resolve()
    if run_dir == parent_dir or parent_dir in run_dir.parents or run_dir in parent_dir.parents:
        raise ConfigError(
            f"run_dir={run.run_dir} overlaps the parent's run directory {parent_dir}; give the compression "
            f"its own run_dir, outside the parent's (e.g. run_dir={parent_dir}_student)"
        )


def load_compress_config(overrides: list[str]):
    """The RunConfig of a compression command: its overrides composed with the parent's model (read
    from compress.parent's checkpoint), so that options depending on the model (parallel.ep for a
    parent with MoE layers) are checked against it and not against the default model. A parent that
    cannot be read is reported by `parent_run`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from pipeline.config import compose_config, to_run_config

    cfg = compose_config(overrides)
    if cfg.compress.parent:
        try:
            model = ckpt.read_meta(ckpt.resolve_checkpoint(cfg.compress.parent)).model
            cfg.model = OmegaConf.merge(OmegaConf.structured(ModelConfig), model)
        except (CheckpointError, ConfigError, OSError, ValueError, OmegaConfBaseException):
            pass
    return to_run_config(cfg)


def parent_run(run) -> ParentRun:
    """`run` set up for its parent checkpoint (compress.parent); fails before any work on a bad parent."""
    if not run.compress.parent:
        raise ConfigError("compress.parent is not set; give the parent checkpoint, e.g. compress.parent=runs/tiny")
    step_dir, meta, model, tensors = open_parent(run.compress.parent)
    tensors.close()
    train = dataclasses.replace(run.train, seq_length=min(run.train.seq_length, model.seq_length))
    return ParentRun(dataclasses.replace(run, model=model, train=train), step_dir, parent_identity(step_dir, meta))
