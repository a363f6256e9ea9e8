"""The on-disk layout of a preprocessed dataset, and the only code that writes or checks it.

For an output prefix P:

    P_00000.bin / P_00000.idx ...   megatron-core indexed datasets, one per shard
    P.progress.json                 while running: the shards finished so far (for resuming)
    P.json                          when complete: the summary (the dataset's table of contents)

A shard is written as `P_00000.bin.tmp`/`.idx.tmp` and renamed when complete; the summary is written
last, so an interrupted run never leaves a dataset that looks finished. A re-run with the same inputs
and options resumes after the last shard recorded in the progress file.

With --overwrite the new dataset is built aside, in `.<name>.overwrite/` next to P (resumable the
same way), and swapped in only when complete: until then the old dataset stays whole and usable.

Each shard's record in the summary holds, per file, its size and `*_edges_sha256`, a digest of its
first and last EDGE_BYTES: `check_shard` compares them, and the .idx header against them, whenever
a dataset is opened, at a cost that does not grow with the dataset's size.
"""

import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from typing import Optional

import numpy as np

from pipeline.errors import DataError
from pipeline.fs import atomic_write_text, fsync_dir, storage_error

SUMMARY_FORMAT = "pipeline.data.preprocess/1"
EDGE_BYTES = 1 << 16
IDX_MAGIC = b"MMIDIDX\x00\x00"
IDX_HEADER = struct.Struct("<9sQBQQ")
"""megatron-core .idx header: magic, version, dtype code, sequence count, document count."""
DTYPE_CODES = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "float64": 6, "float32": 7, "uint16": 8}
"""megatron-core's DType codes in the .idx header (indexed_dataset.DType; a test checks they agree)."""
CODE_DTYPES = {code: name for name, code in DTYPE_CODES.items()}


def summary_path(prefix: str) -> str:
    return prefix + ".json"


def progress_path(prefix: str) -> str:
    return prefix + ".progress.json"


def shard_prefix(prefix: str, index: int) -> str:
    return f"{prefix}_{index:05d}"


def staging_prefix(prefix: str) -> str:
    """Where an --overwrite run builds the dataset that replaces `prefix` when complete."""
    directory, name = os.path.split(prefix)
    return os.path.join(directory, f".{name}.overwrite", name)


def token_dtype(vocab_size: int):
    """Token dtype for a vocabulary: megatron-core's DType.optimal_dtype rule (a test checks they agree)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def _shard_files(prefix: str) -> list[str]:
    """Existing shard files of `prefix` (finished or temporary), and nothing else."""
    directory, name = os.path.split(os.path.abspath(prefix))
    if not os.path.isdir(directory):
        return []
    pattern = re.compile(re.escape(name) + r"_\d{5,}\.(bin|idx)(\.tmp)?")
    return sorted(os.path.join(os.path.dirname(prefix), f) for f in os.listdir(directory)
                  if pattern.fullmatch(f))


def _dataset_files(prefix: str) -> list[str]:
    return [p for p in (summary_path(prefix), progress_path(prefix)) if os.path.exists(p)] + _shard_files(prefix)


def ensure_writable(prefix: str) -> None:
    """Create the directory of `prefix` if needed and prove a file can be written there.

    Raises StorageError naming the directory (missing parent that cannot be made, a file in the way,
    read-only or full file system, permissions).
    """
    directory = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as error:
        raise storage_error(error, "the preprocessed dataset", directory) from None


def prepare_output(prefix: str, fingerprint: str, overwrite: bool) -> tuple[str, list[dict]]:
    """Make `prefix` ready to write: the prefix to write shards under, and the shard records of an
    interrupted run to resume from.

    Without `overwrite` that is `prefix` itself, and an existing complete or foreign output is
    refused with DataError. With `overwrite` it is the staging prefix beside it; an interrupted
    overwrite run with the same fingerprint is resumed, anything else there is cleared.
    """
    ensure_writable(prefix)
    if overwrite:
        staging = staging_prefix(prefix)
        if _progress_fingerprint(staging) != fingerprint:
            shutil.rmtree(os.path.dirname(staging), ignore_errors=True)
        os.makedirs(os.path.dirname(staging), exist_ok=True)
        return staging, _resumable_shards(staging, fingerprint)
    if os.path.exists(summary_path(prefix)):
        raise DataError(
            f"output {prefix} already exists ({summary_path(prefix)}); pass --overwrite to replace it "
            f"(the old dataset stays until the new one is complete)"
        )
    if not os.path.exists(progress_path(prefix)):
        leftovers = [p for p in _shard_files(prefix) if not p.endswith(".tmp")]
        if leftovers:
            raise DataError(
                f"{leftovers[0]} exists but there is no summary or progress file for {prefix}; pass "
                f"--overwrite to replace it"
            )
    elif _progress_fingerprint(prefix) != fingerprint:
        raise DataError(
            f"{progress_path(prefix)} is from a run with other inputs or options; re-run with those "
            f"or pass --overwrite to start over"
        )
    return prefix, _resumable_shards(prefix, fingerprint)


def _progress_fingerprint(prefix: str) -> Optional[str]:
    try:
        with open(progress_path(prefix), encoding="utf-8") as f:
            return json.load(f).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _resumable_shards(prefix: str, fingerprint: str) -> list[dict]:
    """The intact shards recorded in `prefix`'s progress file; every other shard file is removed."""
    done = []
    if _progress_fingerprint(prefix) == fingerprint:
        with open(progress_path(prefix), encoding="utf-8") as f:
            for record in json.load(f)["shards"]:
                if not _sizes_match(prefix, record):
                    break
                done.append(record)
    for path in _shard_files(prefix):
        if not any(path.startswith(shard_prefix(prefix, r["index"]) + ".") for r in done):
            os.remove(path)
    return done


def _sizes_match(prefix: str, record: dict) -> bool:
    base = shard_prefix(prefix, record["index"])
    return all(
        os.path.exists(base + ext) and os.path.getsize(base + ext) == record[key]
        for ext, key in ((".bin", "bin_bytes"), (".idx", "idx_bytes"))
    )


def publish(staging: str, prefix: str) -> None:
    """Move the complete dataset at `staging` to `prefix`, replacing what is there.

    The old summary goes first and the new one comes last, so a crash in between leaves no dataset
    that looks complete (re-running the --overwrite command rebuilds it).
    """
    directory, name = os.path.split(prefix)
    old = os.path.join(directory, f".{name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.makedirs(old)
    for path in _dataset_files(prefix):
        os.replace(path, os.path.join(old, os.path.basename(path)))
    for path in _shard_files(staging) + [summary_path(staging)]:
        os.replace(path, os.path.join(directory, os.path.basename(path)))
    fsync_dir(directory or ".")
    shutil.rmtree(old)
    shutil.rmtree(os.path.dirname(staging))


def discard(prefix: str) -> None:
    """Remove the shards and progress file of an unfinished run at `prefix`."""
    for path in _dataset_files(prefix):
        os.remove(path)
    if os.path.basename(os.path.dirname(prefix)).endswith(".overwrite"):
        shutil.rmtree(os.path.dirname(prefix), ignore_errors=True)


class ShardWriter:
    """Writes one shard in megatron-core's indexed-dataset format (`.bin` tokens, `.idx` index), under
    temporary names. The index is written here with numpy, byte for byte what megatron-core's
    IndexedDatasetBuilder.finalize writes (tests/unit/test_data_preprocess.py compares them): its
    pointer computation is a Python loop over numpy scalars, about a microsecond per document in the
    single writing process, and importing it pulls in torch (seconds and a gigabyte at startup)."""

    def __init__(self, prefix: str, index: int, vocab_size: int) -> None:
        self.dtype = np.dtype(token_dtype(vocab_size))
        self.index = index
        self.base = shard_prefix(prefix, index)
        try:
            self.data_file = open(self.base + ".bin.tmp", "wb")
        except OSError as error:
            raise storage_error(error, "a dataset shard", self.base + ".bin") from None
        self.lengths: list[np.ndarray] = []
        self.documents = 0
        self.tokens = 0
        self.input_bytes = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray, input_bytes: int) -> None:
        """Append documents given as concatenated `tokens` (of the shard's dtype) and their `lengths`."""
        try:
            self.data_file.write(memoryview(np.ascontiguousarray(tokens, dtype=self.dtype)).cast("B"))
        except OSError as error:
            raise storage_error(error, "a dataset shard", self.base + ".bin") from None
        self.lengths.append(np.asarray(lengths, dtype=np.int32))
        self.documents += len(lengths)
        self.tokens += int(tokens.size)
        self.input_bytes += input_bytes

    def _write_index(self, path: str) -> None:
        """megatron-core's .idx: header, then per document its length (int32) and byte offset in the
        .bin (int64), then the document boundaries in sequences, [0, 1, ..., documents] (int64)."""
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int32)
        pointers = np.zeros(lengths.size, dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        with open(path, "wb") as f:
            f.write(IDX_HEADER.pack(IDX_MAGIC, 1, DTYPE_CODES[self.dtype.name], lengths.size, lengths.size + 1))
            for array in (lengths, pointers, np.arange(lengths.size + 1, dtype=np.int64)):
                f.write(memoryview(array).cast("B"))

    def finish(self) -> dict:
        """Write the index, rename both files to their final names and return the shard's record."""
        record = {"index": self.index, "prefix": os.path.basename(self.base)}
        try:
            self.data_file.close()
            self._write_index(self.base + ".idx.tmp")
            for ext in (".bin", ".idx"):
                _fsync(self.base + ext + ".tmp")
                os.replace(self.base + ext + ".tmp", self.base + ext)
                record[f"{ext[1:]}_bytes"] = os.path.getsize(self.base + ext)
            fsync_dir(os.path.dirname(os.path.abspath(self.base)))
        except OSError as error:
            raise storage_error(error, "a dataset shard", self.base + ".bin") from None
        record.update(documents=self.documents, tokens=self.tokens, input_bytes=self.input_bytes)
        for ext in ("bin", "idx"):
            record[f"{ext}_edges_sha256"] = edges_sha256(f"{self.base}.{ext}")
        return record

    def abort(self) -> None:
        """Close and delete the unfinished shard."""
        self.data_file.close()
        for ext in (".bin.tmp", ".idx.tmp"):
            if os.path.exists(self.base + ext):
                os.remove(self.base + ext)


def edges_sha256(path: str) -> str:
    """Digest of the first and last EDGE_BYTES of the file `path`."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(EDGE_BYTES))
        size = f.seek(0, os.SEEK_END)
        f.seek(max(size - EDGE_BYTES, 0))
        digest.update(f.read(EDGE_BYTES))
    return digest.hexdigest()


def check_shard(base: str, record: Optional[dict], fix: str) -> int:
    """Check the indexed dataset `base`.bin/.idx before megatron-core opens it; return its documents.

    With the summary's `record`: sizes, edge digest and document count as recorded; always: the .idx
    header is megatron-core's and its counts agree with both file sizes. Raises DataError naming the
    damaged file, the damage and `fix`.
    """
    idx, bin_ = base + ".idx", base + ".bin"
    for path in (idx, bin_):
        if not os.path.isfile(path):
            raise DataError(f"{path} is missing; {fix}")
    if record is not None:
        for path, key in ((idx, "idx_bytes"), (bin_, "bin_bytes")):
            size = os.path.getsize(path)
            if size != record[key]:
                raise DataError(f"{path} has {size} bytes, {record[key]} when written (truncated or "
                                f"replaced); {fix}")
    sequences, itemsize, pointers_end = _read_idx(idx, fix)
    if record is not None and sequences != record["documents"]:
        raise DataError(f"{idx} indexes {sequences} documents, {record['documents']} when written; {fix}")
    if os.path.getsize(bin_) != pointers_end:
        raise DataError(f"{bin_} has {os.path.getsize(bin_)} bytes but {idx} indexes {pointers_end} "
                        f"(truncated or mismatched pair); {fix}")
    for path, key in ((idx, "idx_edges_sha256"), (bin_, "bin_edges_sha256")):
        if record is not None and key in record and edges_sha256(path) != record[key]:
            raise DataError(f"{path} differs from the file written (checksum of its first and last "
                            f"{EDGE_BYTES // 1024} KiB); {fix}")
    return sequences


def _read_idx(path: str, fix: str) -> tuple[int, int, int]:
    """(sequence count, token size in bytes, end of the last sequence in the .bin) from a .idx,
    checking its header and its size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header = f.read(IDX_HEADER.size)
        if len(header) < IDX_HEADER.size:
            raise DataError(f"{path} is {size} bytes, shorter than an index header; {fix}")
        magic, version, code, sequences, documents = IDX_HEADER.unpack(header)
        if magic != IDX_MAGIC or version != 1 or code not in DTYPE_CODES.values():
            raise DataError(f"{path} does not start with a megatron-core index header; {fix}")
        expected = IDX_HEADER.size + 12 * sequences + 8 * documents
        if size not in (expected, expected + sequences):  # + one mode byte per sequence, if stored
            raise DataError(f"{path} has {size} bytes but its header implies {expected} (truncated or "
                            f"damaged); {fix}")
        itemsize = np.dtype(CODE_DTYPES[code]).itemsize
        if sequences == 0:
            return 0, itemsize, 0
        f.seek(IDX_HEADER.size + 4 * (sequences - 1))
        last_length = int(np.frombuffer(f.read(4), dtype="<i4")[0])
        f.seek(IDX_HEADER.size + 4 * sequences + 8 * (sequences - 1))
        last_pointer = int(np.frombuffer(f.read(8), dtype="<i8")[0])
    return sequences, itemsize, last_pointer + last_length * itemsize


def write_progress(prefix: str, fingerprint: str, shards: list[dict]) -> None:
    _write_json(progress_path(prefix), {"fingerprint": fingerprint, "shards": shards})


def write_summary(prefix: str, summary: dict) -> None:
    """Write the summary (marking the dataset complete) and drop the progress file."""
    _write_json(summary_path(prefix), {"format": SUMMARY_FORMAT, **summary})
    if os.path.exists(progress_path(prefix)):
        os.remove(progress_path(prefix))


def read_summary(prefix: str) -> Optional[dict]:
    """The summary of a complete preprocessed dataset at `prefix`, or None if there is none."""
    path = summary_path(prefix)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except ValueError as error:
        raise DataError(f"{path} is not valid JSON ({error}); re-run preprocessing with --overwrite") from None
    if not isinstance(summary, dict) or summary.get("format") != SUMMARY_FORMAT:
        raise DataError(f"{path} is not a preprocessing summary ({SUMMARY_FORMAT}); check the path")
    return summary


def _write_json(path: str, content: dict) -> None:
    try:
        atomic_write_text(path, json.dumps(content, indent=2) + "\n")
    except OSError as error:
        raise storage_error(error, os.path.basename(path), os.path.dirname(os.path.abspath(path))) from None


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
