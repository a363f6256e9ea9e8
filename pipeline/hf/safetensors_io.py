"""Streaming safetensors: write a sharded HF checkpoint one tensor at a time, read one tensor at a time.

The `safetensors` library's writers take a whole dict of tensors; an 8B model's shard would then sit
in memory. The format is simple (8-byte little-endian header length, a JSON header giving each
tensor's dtype, shape and byte range, then the raw bytes), and every shape is known before any data
is read, so `ShardWriter` writes the header first and then each tensor's bytes as it arrives.
"""

import json
import os
import struct
from pathlib import Path
from typing import Iterable

import torch

from pipeline.hf import ConversionError

DTYPE_CODES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
HEADER_ALIGN = 8
"""The safetensors library pads its JSON header with spaces to a multiple of 8 bytes; so do we."""
COPY_BLOCK = 64 * 2**20
"""Bytes moved per step where data passes through memory (casts, copies without copy_file_range)."""


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


Entry = tuple[str, tuple[int, ...], torch.dtype]
"""A tensor to write: (name, shape, dtype)."""


def plan_shards(entries: Iterable[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Split (name, shape, dtype) entries, in order, into shards of at most `max_shard_bytes` (a
    larger single tensor gets a shard of its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for name, shape, dtype in entries:
        n = _nbytes(shape, dtype)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape, dtype))
        size += n
    return shards


def shard_file_names(count: int) -> list[str]:
    """HF's shard names: model-00001-of-00003.safetensors, ..."""
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardWriter:
    """One .safetensors file whose tensors are given up front (name, shape, dtype) and written in that
    order, each either from memory (`write`) or copied file to file from byte ranges (`copy`)."""

    def __init__(self, path: Path, entries: list[Entry]):
        self.path = path
        self._pending = list(entries)
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in entries:
            end = offset + _nbytes(shape, dtype)
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        self.data_bytes = offset
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % HEADER_ALIGN)
        # Unbuffered: `copy` moves bytes with the file descriptor's own position.
        self._file = open(path, "wb", buffering=0)
        self._write_all(struct.pack("<Q", len(text)) + text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor's bytes (cast to its planned dtype); name and shape must match the plan."""
        dtype = self._next(name, tuple(tensor.shape))
        flat = tensor.detach().cpu().contiguous().view(-1)
        # Cast block by block: a converted copy of the whole embedding would double peak memory.
        step = COPY_BLOCK // dtype.itemsize
        for start in range(0, flat.numel(), step):
            block = flat[start : start + step].to(dtype)
            self._write_all(block.view(torch.uint8).numpy().data)

    def copy(self, name: str, shape: tuple[int, ...], runs: list[tuple[int, int, int]]) -> None:
        """Append the next tensor by copying (file descriptor, offset, length) runs of another file,
        in the kernel where the filesystem allows (copy_file_range), else through a small buffer."""
        dtype = self._next(name, shape)
        if sum(n for _, _, n in runs) != _nbytes(shape, dtype):
            raise ConversionError(f"internal: byte runs for {name} do not add up to its size")
        for fd, offset, length in runs:
            _copy_range(fd, offset, length, self._file.fileno())

    def close(self) -> None:
        """Finish the file; every planned tensor must have been written."""
        self._file.close()
        if self._pending:
            raise ConversionError(f"internal: {self.path.name} is missing {len(self._pending)} tensors")

    def _next(self, name: str, shape: tuple[int, ...]) -> torch.dtype:
        expected, planned, dtype = self._pending[0]
        if name != expected or shape != planned:
            raise ConversionError(f"internal: tensor {name} {shape} written where {expected} {planned} was planned")
        self._pending.pop(0)
        return dtype

    def _write_all(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            view = view[self._file.write(view) :]


def _copy_range(src_fd: int, offset: int, length: int, dst_fd: int) -> None:
    """Append `length` bytes at `offset` of `src_fd` to `dst_fd` (at its current position)."""
    done = 0
    try:
        while done < length:
            copied = os.copy_file_range(src_fd, dst_fd, length - done, offset + done)
            if copied == 0:
                break
            done += copied
    except OSError:
        pass  # e.g. EXDEV across filesystems on some kernels: finish through user space
    while done < length:
        data = os.pread(src_fd, min(COPY_BLOCK, length - done), offset + done)
        if not data:
            raise ConversionError(f"source file ends {length - done} bytes early; the checkpoint is truncated")
        view = memoryview(data)
        while len(view):
            view = view[os.write(dst_fd, view) :]
        done += len(data)


def write_index(directory: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    """model.safetensors.index.json: which shard holds each tensor."""
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def hf_weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the .safetensors file holding it, from the index or a single model.safetensors."""
    index = directory / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / SINGLE_NAME
    if single.is_file():
        with open_safetensors(single) as f:
            return {name: single for name in f.keys()}
    raise ConversionError(
        f"{directory} has neither {INDEX_NAME} nor {SINGLE_NAME}; give a Hugging Face model directory "
        f"with safetensors weights"
    )


def open_safetensors(path: Path):
    """safetensors' reader for `path`; ConversionError naming the file if it is truncated or not safetensors."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), "pt")
    except SafetensorError as e:
        raise ConversionError(
            f"{path} is not a readable safetensors file ({str(e).strip()}); "
            "it is truncated or damaged: download it again"
        ) from None


class HFTensors:
    """Read tensors of an HF safetensors checkpoint by name, one at a time."""

    def __init__(self, directory: Path):
        self.files = hf_weight_files(directory)
        self._open: dict[Path, object] = {}

    def _handle(self, name: str):
        path = self.files[name]
        if path not in self._open:
            if not path.is_file():
                raise ConversionError(f"{path} (listed in {INDEX_NAME}) does not exist; the download is incomplete")
            self._open[path] = open_safetensors(path)
        return self._open[path]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name` (read from the header only)."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype code of tensor `name` (F32, BF16, ...; read from the header only)."""
        return self._handle(name).get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name` as stored."""
        return self._handle(name).get_tensor(name)
