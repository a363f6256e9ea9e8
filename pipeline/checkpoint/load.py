"""Loading a checkpoint's sharded state into a model (and optimizer) at any TP/PP/DP layout.

Model tensors are stored under megatron-core's global sharded keys (layer index global, Mamba fused
tensors split per component), so any layout can load them. Pickled parts are read through
`safe_loading.safe_checkpoint_loading` (docs/checkpoints.md: a checkpoint is code).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.checkpoint.layout import verify_checkpoint
from pipeline.checkpoint.safe_loading import safe_checkpoint_loading
from pipeline.errors import CheckpointError, UnsafeCheckpointError, find_cause

if TYPE_CHECKING:
    import torch


def available_keys(ckpt_dir: str | Path) -> set[str]:
    """Keys of every tensor and object stored in a checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader

    with safe_checkpoint_loading():
        return set(FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata)


def drop_missing_extra_state(sharded_state: dict, keys: set[str]) -> dict:
    """Without the TE FP8 metadata (`_extra_state`) a checkpoint from the portable backend still loads."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    def keep(value) -> bool:
        return not (isinstance(value, ShardedObject) and value.key.endswith("_extra_state")
                    and value.unique_key not in keys and value.key not in keys)

    def walk(node):
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items() if keep(v)}
        return node

    return walk(sharded_state)


def verify_once(ckpt_dir: Path) -> None:
    """`verify_checkpoint` by rank 0 for every rank of the process group (each rank reading samples of
    every file would read a checkpoint once per rank); its error, if any, raised on all ranks."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        verify_checkpoint(ckpt_dir)
        return
    outcome = [None]
    if dist.get_rank() == 0:
        try:
            verify_checkpoint(ckpt_dir)
        except (CheckpointError, OSError) as e:  # the other ranks wait in the broadcast
            outcome = [e]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise outcome[0]


def load_checkpoint(ckpt_dir: str | Path, sharded_state: dict) -> dict:
    """Load `sharded_state` (all ranks), tolerating FP8 metadata absent from the checkpoint.

    The checkpoint is verified first (`verify_checkpoint`, by rank 0). Pickled parts are read through
    `safe_checkpoint_loading` (an allow-list: UnsafeCheckpointError otherwise); any other failure is a
    CheckpointError naming the checkpoint."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    ckpt_dir = Path(ckpt_dir)
    verify_once(ckpt_dir)
    try:
        sharded_state = drop_missing_extra_state(sharded_state, available_keys(ckpt_dir))
        with safe_checkpoint_loading():
            return dist_checkpointing.load(sharded_state, str(ckpt_dir))
    except (Exception, CheckpointException) as exc:  # torch's CheckpointException is a BaseException
        unsafe = find_cause(exc, lambda e: isinstance(e, UnsafeCheckpointError))
        if unsafe is not None:
            raise unsafe from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise CheckpointError(
            f"cannot load checkpoint {ckpt_dir}: {type(exc).__name__}: {first}; it is damaged or does not fit "
            f"this model (move it away to fall back to the previous one)"
        ) from exc


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
