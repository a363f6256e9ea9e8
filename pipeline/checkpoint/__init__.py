"""Checkpoints: the one package that knows how a run's state sits on disk. `__all__` is its API.

- `config`          the `checkpoint` config group (when to save, what to keep, init_from)
- `layout`          directory layout, meta.json, finding and verifying checkpoints (no torch)
- `writer`          saving, at once or in a background process, committed atomically
- `load`            loading sharded state into model chunks at any TP/PP/DP
- `optimizer_state` the distributed optimizer's share of a save and of a load
- `safe_loading`    the allow-list every pickle in a checkpoint is read through
- `reader`          whole tensors from a checkpoint without a process group (export, compression)

What a training run saves and when is the trainer's policy (`pipeline/training/state.py`).
Layout, config and the errors import without torch; the rest is imported on first use, so that
composing a run config does not pay for torch and its checkpoint package (~1.8 s).
"""

import importlib

from pipeline.checkpoint.config import CheckpointConfig
from pipeline.checkpoint.layout import (
    COMPLETE,
    DCP_METADATA,
    FORMAT,
    LATEST,
    META,
    PREFIX,
    RUN_CONFIG,
    SHAPE_FIELDS,
    TMP_PREFIX,
    CheckpointMeta,
    check_compatible,
    find_resumable,
    fingerprint,
    latest_checkpoint,
    read_meta,
    remove_stale_temporaries,
    resolve_checkpoint,
    run_dir_of,
    step_dir_name,
    step_dirs,
    verify_checkpoint,
)

_LAZY = {
    "load": ("available_keys", "load_checkpoint", "model_sharded_state", "apply_model_state", "load_model"),
    "writer": ("CheckpointWriter", "SaveReport", "save_checkpoint"),
    "optimizer_state": ("optimizer_sharded_state", "load_optimizer_state", "fully_reshardable_state",
                        "fast_optimizer_state_saving"),
    "safe_loading": ("safe_checkpoint_loading",),
    "reader": ("CheckpointTensors",),
}
_LAZY_OWNER = {name: module for module, names in _LAZY.items() for name in names}

__all__ = [
    "CheckpointConfig", "COMPLETE", "DCP_METADATA", "FORMAT", "LATEST", "META", "PREFIX", "RUN_CONFIG",
    "SHAPE_FIELDS", "TMP_PREFIX", "CheckpointMeta", "check_compatible", "find_resumable", "fingerprint",
    "latest_checkpoint", "read_meta", "remove_stale_temporaries", "resolve_checkpoint", "run_dir_of", "step_dir_name",
    "step_dirs", "verify_checkpoint", *_LAZY_OWNER,
]


def __getattr__(name: str):
    if name in _LAZY_OWNER:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY_OWNER[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
