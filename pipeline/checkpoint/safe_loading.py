"""Reading a checkpoint's pickled parts through an allow-list (docs/checkpoints.md: a checkpoint is code).

Patch of torch 2.11's `torch.distributed.checkpoint`, as used by megatron-core 0.19.2's torch_dist
loader. Reading a checkpoint unpickles bytes from disk in three places: `FileSystemReader.read_metadata`
is a plain `pickle.load` of `.metadata`, every stored object (megatron's common state, our RNG and
train state) goes through `DefaultLoadPlanner.load_bytes`, a `torch.load(weights_only=False)`, and
megatron's `load_common` reads a legacy `common.pt` with a bare `torch.load`, which the environment
variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns into a full unpickle. A crafted checkpoint would
run code in all three. Inside `safe_checkpoint_loading()` they read with an
allow-list instead; an `UnsafeCheckpointError` names what was refused. Every file `.metadata` names
(`relative_path`) must lie inside the checkpoint directory.
Remove when torch's DCP reader unpickles `.metadata` with an allow-list and loads bytes with
`weights_only=True` by default (not the case in torch 2.11).
"""

import io
import pickle
import re
import sys
from contextlib import contextmanager

import torch

from pipeline.checkpoint.layout import inside
from pipeline.errors import UnsafeCheckpointError

# Every global that torch's `.metadata` pickle of a megatron-core checkpoint references (found by
# recording `find_class` over real checkpoints): torch's checkpoint metadata records, torch.Size, the
# layout and memory-format decoders, dtypes, and megatron's empty placeholder class from 0.15; torch's
# own FileSystemWriter also records the checkpoint path as a PosixPath (built from strings only).
_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"),
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"),
} | {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                 "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
}


class _AllowListUnpickler(pickle.Unpickler):
    """Unpickles only the globals in _METADATA_GLOBALS and torch dtypes."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self._source} references {module}.{name}, which is not on the checkpoint allow-list; refusing to "
            f"open it (a checkpoint is code, like a pickle file: open only checkpoints you trust)"
        )


def _safe_read_metadata(self, *args, **kwargs):
    # The body of FileSystemReader.read_metadata (torch 2.11) with the allow-list unpickler.
    from torch.distributed.checkpoint.metadata import StorageMeta

    path = self._get_metadata_path(kwargs.get("rank"))
    with self.fs.create_stream(path, "rb") as f:
        try:
            metadata = _AllowListUnpickler(f, str(path)).load()
        except UnsafeCheckpointError:
            raise
        except Exception as e:
            raise UnsafeCheckpointError(
                f"{path} is not a torch checkpoint metadata file ({type(e).__name__}: {e})"
            ) from None
    # One check per file named (hundreds of items share a few files; each check resolves paths).
    for name in sorted({info.relative_path for info in (getattr(metadata, "storage_data", None) or {}).values()}):
        inside(self.path, name, str(path))
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = self.load_id
    return metadata


def _object_globals() -> list:
    """What a Megatron-LM / Megatron-Bridge checkpoint's common state references besides plain data
    (found with `torch.serialization.get_unsafe_globals_in_checkpoint` on checkpoints written by
    megatron-core 0.19.2's megatron/training): the stored `args` Namespace and the enums among its
    values (megatron's, and signal.Signals for --exit-signal). Constructing any of them runs no code."""
    import argparse
    import enum
    import signal

    allowed = [argparse.Namespace, signal.Signals]
    # Only where megatron is loaded already (it is whenever its loader reads the common state):
    # importing it costs readers without it (export) seconds.
    for name in ("megatron.core.enums", "megatron.core.transformer.enums"):
        module = sys.modules.get(name)
        if module is None:
            continue
        allowed += [v for v in vars(module).values()
                    if isinstance(v, type) and issubclass(v, enum.Enum) and v.__module__ == module.__name__]
    return allowed


def _load_plain(source, what: str, **kwargs):
    """torch.load with weights_only=True passed explicitly (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD overrides
    only an implicit default): tensors, containers and plain values only, which is all that we and
    megatron store, plus the few classes of `_object_globals`. UnsafeCheckpointError naming `what` and
    the refused global otherwise."""
    try:
        with torch.serialization.safe_globals(_object_globals()):
            return torch.load(source, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        why = f"references {found.group(1)}" if found else "is not plain data"
        raise UnsafeCheckpointError(
            f"{what} {why}, which the checkpoint allow-list (weights_only loading) does not allow; refusing "
            f"to open it (a checkpoint is code, like a pickle file: open only checkpoints you trust)"
        ) from None


def _safe_load_bytes(self, read_item, value: io.BytesIO) -> None:
    # DefaultLoadPlanner.load_bytes (torch 2.11) with weights_only=True.
    obj = _load_plain(value, f"stored object {read_item.dest_index.fqn}")
    if self.flatten_state_dict:
        from torch.distributed.checkpoint._traverse import set_element

        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
    else:
        self.state_dict[read_item.dest_index.fqn] = obj


def _safe_load_common(checkpoint_dir: str):
    # megatron-core 0.19.2 strategies.common.load_common (a legacy common.pt) with weights_only=True.
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

    path = f"{checkpoint_dir}/{COMMON_STATE_FNAME}"
    return _load_plain(path, path, map_location="cpu")


@contextmanager
def safe_checkpoint_loading():
    """Read checkpoints with the allow-listed unpickler for `.metadata` and `weights_only=True` for
    stored objects and a legacy common.pt, whatever the environment says (module docstring); an
    UnsafeCheckpointError names what was refused. Nested use is harmless: an inner context finds the
    safe readers in place and leaves them there."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    # megatron's loader is patched only where it is imported (load.load_checkpoint imports it before
    # entering): importing megatron here would cost readers without it (export) seconds and a page of
    # warnings on stderr.
    megatron = sys.modules.get("megatron.core.dist_checkpointing.serialization")
    saved = FileSystemReader.read_metadata, DefaultLoadPlanner.load_bytes
    FileSystemReader.read_metadata = _safe_read_metadata
    DefaultLoadPlanner.load_bytes = _safe_load_bytes
    if megatron is not None:
        load_common, megatron.load_common = megatron.load_common, _safe_load_common
    try:
        yield
    finally:
        FileSystemReader.read_metadata, DefaultLoadPlanner.load_bytes = saved
        if megatron is not None:
            megatron.load_common = load_common
