"""The only module that knows the on-disk checkpoint layout.

    run_dir/checkpoints/
      latest                 name of the newest complete checkpoint ("step_0000100")
      step_0000100/          megatron-core dist_checkpointing (torch_dist) + meta.json,
                             run_config.yaml and COMPLETE (written last)
      .tmp-step_0000200/     a save in progress; renamed when complete

A save is visible only after the atomic rename of a directory that already holds COMPLETE, and
`latest` is replaced atomically after that, so a process killed at any moment leaves the previous
checkpoint usable. Model tensors are stored under megatron-core's global sharded keys (layer index
global, Mamba fused tensors split per component), so any TP/PP/DP layout can load them.
"""

import json
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from pipeline.errors import CheckpointError


@dataclass
class CheckpointConfig:
    """When to save and what to keep; restarting with the same run_dir resumes from the latest."""

    save_interval: int = 100
    """Save every N steps (also at the end and on SIGTERM/SIGUSR1); 0 = only those."""
    keep_last: int = 3
    """Keep the newest K checkpoints (0 keeps all)."""
    resume: bool = True
    """Resume from run_dir/checkpoints/latest when it exists."""
    init_from: Optional[str] = None
    """Start a new run from these weights (a checkpoint, e.g. an imported HF model): weights only."""


FORMAT = 1
LATEST = "latest"
COMPLETE = "COMPLETE"
META = "meta.json"
RUN_CONFIG = "run_config.yaml"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
# Model fields a checkpoint's weights depend on: resuming with other values is refused.
SHAPE_FIELDS = (
    "pattern", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "mamba_num_heads", "mamba_head_dim", "mamba_num_groups", "mamba_state_dim",
    "mamba_conv_kernel", "vocab_size", "make_vocab_size_divisible_by",
)


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def _fault_point(name: str, where: str) -> None:
    """Die here when PIPELINE_FAULT is `name` or `name@where`: lets tests kill a save at an exact point."""
    if os.environ.get("PIPELINE_FAULT") in (name, f"{name}@{where}"):
        os.kill(os.getpid(), signal.SIGKILL)


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / META).is_file()


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under `checkpoints_dir` (follows `latest`), or None."""
    root = Path(checkpoints_dir)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if _is_complete(candidate):
            return candidate
    # A missing or stale pointer (e.g. killed between rename and pointer update): scan instead.
    done = sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir() and _is_complete(p)) if root.is_dir() else []
    return done[-1] if done else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory from a run dir, a checkpoints dir or a step dir; CheckpointError if none."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist; give a run dir, its checkpoints/ or a step dir")
    if (path / META).exists() or path.name.startswith(PREFIX):
        if not _is_complete(path):
            raise CheckpointError(
                f"checkpoint {path} is incomplete (no {COMPLETE} marker): its save was interrupted; "
                f"use an earlier step"
            )
        return path
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise CheckpointError(f"no complete checkpoint under {path}; train first or give a step directory")


def read_meta(ckpt_dir: str | Path) -> dict:
    """The checkpoint's meta.json; CheckpointError if missing or incomplete."""
    ckpt_dir = Path(ckpt_dir)
    if not _is_complete(ckpt_dir):
        raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete or missing (no {COMPLETE}/{META})")
    return json.loads((ckpt_dir / META).read_text())


def check_compatible(meta: dict, model_fields: dict, ckpt_dir: Path) -> None:
    """Refuse to resume when the model shape differs from the checkpoint's."""
    saved = meta["model"]
    diff = [f for f in SHAPE_FIELDS if saved.get(f) != model_fields.get(f)]
    if diff:
        f = diff[0]
        raise CheckpointError(
            f"model.{f}={model_fields.get(f)!r} but checkpoint {ckpt_dir} was trained with "
            f"{saved.get(f)!r}; use model.{f}={saved.get(f)!r} or a new run_dir"
        )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(checkpoints_dir: str | Path) -> None:
    """Delete saves that were interrupted (rank 0, at start)."""
    root = Path(checkpoints_dir)
    if root.is_dir():
        for tmp in root.glob(f"{TMP_PREFIX}{PREFIX}*"):
            shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(
    checkpoints_dir: str | Path,
    step: int,
    sharded_state: dict,
    meta: dict,
    run_config_yaml: str,
    keep: int | None = None,
) -> Path:
    """Save on all ranks into a temporary directory, then commit atomically (rank 0)."""
    from megatron.core import dist_checkpointing

    root = Path(checkpoints_dir)
    final = root / step_dir_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    rank0 = dist.get_rank() == 0
    if rank0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    dist_checkpointing.save(sharded_state, str(tmp))
    dist.barrier()
    if rank0:
        (tmp / META).write_text(json.dumps({"format": FORMAT, **meta}, indent=2))
        (tmp / RUN_CONFIG).write_text(run_config_yaml)
        _fault_point("checkpoint-before-commit", final.name)
        (tmp / COMPLETE).touch()
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_atomic(root / LATEST, final.name)
        if keep:
            done = sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir())
            for old in done[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def available_keys(ckpt_dir: str | Path) -> set[str]:
    """Keys of every tensor and object stored in a checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata)


def drop_missing_extra_state(sharded_state: dict, keys: set[str]) -> dict:
    """Without the TE FP8 metadata (`_extra_state`) a checkpoint from the portable backend still loads."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    def keep(value) -> bool:
        return not (isinstance(value, ShardedObject) and value.key.endswith("_extra_state") and value.unique_key not in keys and value.key not in keys)

    def walk(node):
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items() if keep(v)}
        return node

    return walk(sharded_state)


def load_checkpoint(ckpt_dir: str | Path, sharded_state: dict) -> dict:
    """Load `sharded_state` (all ranks), tolerating FP8 metadata absent from the checkpoint."""
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    read_meta(ckpt_dir)
    sharded_state = drop_missing_extra_state(sharded_state, available_keys(ckpt_dir))
    return dist_checkpointing.load(sharded_state, str(ckpt_dir))


def model_sharded_state(chunks: list[torch.nn.Module]) -> dict:
    """{"model": ...} for one chunk, {"model0": ..., "model1": ...} with virtual pipeline stages."""
    modules = [getattr(c, "module", c) for c in chunks]
    if len(modules) == 1:
        return {"model": modules[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(modules)}


def apply_model_state(chunks: list[torch.nn.Module], loaded: dict) -> None:
    """Copy the model weights of a loaded state (from `model_sharded_state`) into the chunks."""
    modules = [getattr(c, "module", c) for c in chunks]
    keys = ["model"] if len(modules) == 1 else [f"model{i}" for i in range(len(modules))]
    for module, key in zip(modules, keys):
        weights = {k: v for k, v in loaded[key].items() if not k.endswith("_extra_state")}
        missing, unexpected = module.load_state_dict(weights, strict=False)
        bad = [k for k in missing if not k.endswith("_extra_state")] + list(unexpected)
        if bad:
            raise CheckpointError(f"checkpoint does not match the model: {bad[:3]}")


def load_model(ckpt_dir: str | Path, chunks: list[torch.nn.Module]) -> None:
    """Load only the weights of a checkpoint into this rank's model chunks (any TP/PP layout)."""
    apply_model_state(chunks, load_checkpoint(ckpt_dir, model_sharded_state(chunks)))
