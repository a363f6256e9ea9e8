"""Read whole tensors from a torch_dist checkpoint directory, without a process group or a model.

megatron-core's torch_dist format is `torch.distributed.checkpoint` (DCP): each tensor is stored as
chunks (one per TP/PP shard that wrote part of it) with global offsets listed in `.metadata`, and
every chunk is one `torch.save` blob inside a `.distcp` file. Filling a preallocated full-size buffer
chunk by chunk assembles a tensor whatever layout wrote it.
"""

import io
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from pipeline.checkpoint.layout import verify_checkpoint
from pipeline.checkpoint.safe_loading import safe_checkpoint_loading
from pipeline.errors import ConversionError


class _CachedMetadataReader(dcp.FileSystemReader):
    """A FileSystemReader that parses `.metadata` once (with the allow-list of
    `safe_loading.safe_checkpoint_loading`): `dcp.load` asks for it on every call."""

    _metadata = None

    def read_metadata(self, *args, **kwargs):
        if self._metadata is None:
            with safe_checkpoint_loading():
                self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


class _FileRange(io.RawIOBase):
    """Bytes [start, start + length) of an open file as a seekable file of their own."""

    def __init__(self, file, start: int, length: int):
        super().__init__()
        self._file, self._start, self._length, self._pos = file, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence] + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._length - self._pos))
        self._file.seek(self._start + self._pos)
        got = self._file.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got


class CheckpointTensors:
    """Full tensors of a torch_dist checkpoint directory, loaded one at a time on demand.

    Every chunk of a tensor is one `torch.save` blob inside a .distcp file. Fast path: the blob's
    raw bytes are read straight into the output buffer (`dcp.load`, measured on the 8B benchmark,
    reads 4x slower than the disk: it unpickles each blob into a fresh tensor, then copies it), or,
    through `byte_ranges`, copied file to file without passing through memory at all. Anything the
    fast path does not recognise (a transform such as compression, a non-contiguous or offset
    storage, another byte order) goes through `dcp.load`, without a process group (no_dist; dcp
    warns that it assumes so). Opening one verifies the checkpoint first (`verify_checkpoint`).
    """

    def __init__(self, ckpt_dir: Path, raw: bool = True):
        self.meta = verify_checkpoint(ckpt_dir)
        """The checkpoint's meta.json, verified."""
        self._dir = Path(ckpt_dir)
        self._raw = raw
        self._reader = _CachedMetadataReader(str(ckpt_dir))
        self._metadata = self._reader.read_metadata()
        tensors = {k: m for k, m in self._metadata.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
        self.chunks = {k: m.chunks for k, m in tensors.items()}
        """Stored pieces of each tensor (one per TP/PP shard that wrote part of it)."""
        self.shapes = {k: tuple(m.size) for k, m in tensors.items()}
        self.dtypes = {k: m.properties.dtype for k, m in tensors.items()}
        self._files: dict[str, object] = {}
        self.raw_reads = 0
        """Chunks read by the fast path (for tests)."""

    def get(self, key: str) -> torch.Tensor:
        """The whole tensor `key`, assembled from all the shards that hold a part of it."""
        buffer = torch.empty(self.shapes[key], dtype=self.dtypes[key])
        places = [self._locate(key, chunk) for chunk in self.chunks[key]] if self._raw else [None]
        if all(places):
            for chunk, (path, offset) in zip(self.chunks[key], places, strict=True):
                self._read_into(path, offset, buffer[_region(chunk)])
            self.raw_reads += len(places)
            return buffer
        with safe_checkpoint_loading():
            dcp.load({key: buffer}, storage_reader=self._reader, no_dist=True)
        return buffer

    def byte_ranges(self, key: str, dtype: torch.dtype) -> list[tuple[int, int, int]] | None:
        """Where tensor `key`'s bytes (row-major) lie on disk: (file descriptor, offset, length) runs
        in order; None unless it is stored in `dtype`, every chunk is a plain blob and the chunks are
        blocks of whole rows (one chunk, or split along dim 0 only, as column-parallel TP shards are)."""
        shape = self.shapes[key]
        if self.dtypes[key] != dtype:
            return None
        chunks = sorted(self.chunks[key], key=lambda c: tuple(c.offsets))
        row = 0
        for chunk in chunks:
            if chunk.offsets[0] != row or any(chunk.offsets[1:]) or tuple(chunk.sizes[1:]) != shape[1:]:
                return None
            row += chunk.sizes[0]
        places = [self._locate(key, chunk) for chunk in chunks] if self._raw else [None]
        if row != shape[0] or not all(places):
            return None
        itemsize = self.dtypes[key].itemsize
        return [
            (self._file(path).fileno(), offset, math.prod(chunk.sizes) * itemsize)
            for chunk, (path, offset) in zip(chunks, places, strict=True)
        ]

    def close(self) -> None:
        """Close the .distcp files the fast path opened."""
        for f in self._files.values():
            f.close()
        self._files.clear()

    def _file(self, relative_path: str):
        if relative_path not in self._files:
            f = open(self._dir / relative_path, "rb", buffering=0)
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self._files[relative_path] = f
        return self._files[relative_path]

    def _locate(self, key: str, chunk) -> tuple[str, int] | None:
        """(file, byte offset) of one chunk's raw data, or None if its blob is not a plain tensor."""
        info = self._metadata.storage_data[MetadataIndex(key, chunk.offsets)]
        if info.transform_descriptors or sys.byteorder != "little":
            return None
        blob = io.BufferedReader(_FileRange(self._file(info.relative_path), info.offset, info.length))
        try:
            records = torch._C.PyTorchFileReader(blob)  # torch.save's zip reader: record offsets
            names = records.get_all_records()
            storages = [n for n in names if n.startswith("data/")]
            if storages != ["data/0"] or ("byteorder" in names and records.get_record("byteorder") != b"little"):
                return None
            data_offset = records.get_record_offset("data/0")
            blob.seek(0)
            # Loading onto the meta device reads only the pickle: the tensor's dtype, shape and layout.
            meta = torch.load(blob, map_location="meta", weights_only=True)
        except Exception:  # noqa: BLE001 - any surprise in the blob: let dcp.load handle it
            return None
        plain = (
            isinstance(meta, torch.Tensor)
            and meta.dtype == self.dtypes[key]
            and tuple(meta.shape) == tuple(chunk.sizes)
            and meta.is_contiguous()
            and meta.storage_offset() == 0
            and meta.untyped_storage().nbytes() == meta.numel() * meta.element_size()
        )
        return (info.relative_path, info.offset + data_offset) if plain else None

    def _read_into(self, path: str, offset: int, region: torch.Tensor) -> None:
        """Read the raw bytes at `offset` of `path` into `region` (a view of the output buffer)."""
        target = region if region.is_contiguous() else torch.empty_like(region)
        f = self._file(path)
        f.seek(offset)
        view = memoryview(target.view(-1).view(torch.uint8).numpy())
        read = 0
        while read < len(view):
            got = f.readinto(view[read:])
            if not got:
                raise ConversionError(f"{f.name} ends inside a tensor; the checkpoint is truncated")
            read += got
        if target is not region:
            region.copy_(target)


def _region(chunk) -> tuple[slice, ...]:
    """Index of a chunk's part of the full tensor."""
    return tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes, strict=True))
