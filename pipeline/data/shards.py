"""The on-disk layout of a preprocessed dataset, and the only code that writes it.

For an output prefix P:

    P_00000.bin / P_00000.idx ...   megatron-core indexed datasets, one per shard
    P.progress.json                 while running: the shards finished so far (for resuming)
    P.json                          when complete: the summary (the dataset's table of contents)

A shard is written as `P_00000.bin.tmp`/`.idx.tmp` and renamed when complete; the summary is written
last, so an interrupted run never leaves a dataset that looks finished. A re-run with the same inputs
and options resumes after the last shard recorded in the progress file.
"""

import json
import os
import re
from typing import Optional

import numpy as np

from pipeline.errors import ConfigError

SUMMARY_FORMAT = "pipeline.data.preprocess/1"


def summary_path(prefix: str) -> str:
    return prefix + ".json"


def progress_path(prefix: str) -> str:
    return prefix + ".progress.json"


def shard_prefix(prefix: str, index: int) -> str:
    return f"{prefix}_{index:05d}"


def token_dtype(vocab_size: int):
    """Token dtype for a vocabulary: megatron-core's DType.optimal_dtype rule (checked when writing)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def _shard_files(prefix: str) -> list[str]:
    """Existing shard files of `prefix` (finished or temporary), and nothing else."""
    directory, name = os.path.split(os.path.abspath(prefix))
    if not os.path.isdir(directory):
        return []
    pattern = re.compile(re.escape(name) + r"_\d{5,}\.(bin|idx)(\.tmp)?")
    return sorted(os.path.join(os.path.dirname(prefix), f) for f in os.listdir(directory)
                  if pattern.fullmatch(f))


def prepare_output(prefix: str, fingerprint: str, overwrite: bool) -> list[dict]:
    """Make `prefix` ready to write; return the shard records of an interrupted run to resume from.

    Raises ConfigError when a complete or foreign output exists and `overwrite` is false.
    """
    parent = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(parent, exist_ok=True)
    if overwrite:
        for path in [summary_path(prefix), progress_path(prefix), *_shard_files(prefix)]:
            if os.path.exists(path):
                os.remove(path)
        return []
    if os.path.exists(summary_path(prefix)):
        raise ConfigError(
            f"output {prefix} already exists ({summary_path(prefix)}); pass --overwrite to replace it"
        )
    for path in _shard_files(prefix):
        if path.endswith(".tmp"):
            os.remove(path)  # a shard the interrupted run did not finish
    if not os.path.exists(progress_path(prefix)):
        leftovers = _shard_files(prefix)
        if leftovers:
            raise ConfigError(
                f"{leftovers[0]} exists but there is no summary or progress file for {prefix}; pass "
                f"--overwrite to replace it"
            )
        return []
    with open(progress_path(prefix), encoding="utf-8") as f:
        progress = json.load(f)
    if progress.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"{progress_path(prefix)} is from a run with other inputs or options; re-run with those "
            f"or pass --overwrite to start over"
        )
    done = []
    for record in progress["shards"]:
        if not _shard_intact(prefix, record):
            break
        done.append(record)
    for path in _shard_files(prefix):
        if not any(path.startswith(shard_prefix(prefix, r["index"]) + ".") for r in done):
            os.remove(path)
    return done


def _shard_intact(prefix: str, record: dict) -> bool:
    base = shard_prefix(prefix, record["index"])
    return all(
        os.path.exists(base + ext) and os.path.getsize(base + ext) == record[key]
        for ext, key in ((".bin", "bin_bytes"), (".idx", "idx_bytes"))
    )


class ShardWriter:
    """Writes one shard through megatron-core's IndexedDatasetBuilder, under temporary names."""

    def __init__(self, prefix: str, index: int, vocab_size: int) -> None:
        DType, IndexedDatasetBuilder = _megatron_indexed_dataset()
        dtype = DType.optimal_dtype(vocab_size)
        if dtype != token_dtype(vocab_size):
            raise RuntimeError(f"token_dtype({vocab_size}) disagrees with megatron-core's optimal_dtype")
        self.index = index
        self.base = shard_prefix(prefix, index)
        self.builder = IndexedDatasetBuilder(self.base + ".bin.tmp", dtype=dtype)
        self.documents = 0
        self.tokens = 0
        self.input_bytes = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray, input_bytes: int) -> None:
        """Append documents given as concatenated `tokens` and their `lengths`.

        Goes through the builder's file and index lists in bulk: its add_document converts and
        appends one document at a time, too slow in the single writing process for small documents.
        """
        builder = self.builder
        builder.data_file.write(tokens.tobytes(order="C"))
        builder.sequence_lengths.extend(lengths.tolist())
        start = len(builder.document_indices)
        builder.document_indices.extend(range(start, start + len(lengths)))
        self.documents += len(lengths)
        self.tokens += int(tokens.size)
        self.input_bytes += input_bytes

    def finish(self) -> dict:
        """Write the index, rename both files to their final names and return the shard's record."""
        self.builder.finalize(self.base + ".idx.tmp")
        record = {"index": self.index, "prefix": os.path.basename(self.base)}
        for ext in (".bin", ".idx"):
            _fsync(self.base + ext + ".tmp")
            os.replace(self.base + ext + ".tmp", self.base + ext)
            record[f"{ext[1:]}_bytes"] = os.path.getsize(self.base + ext)
        record.update(documents=self.documents, tokens=self.tokens, input_bytes=self.input_bytes)
        return record

    def abort(self) -> None:
        """Close and delete the unfinished shard."""
        self.builder.data_file.close()
        for ext in (".bin.tmp", ".idx.tmp"):
            if os.path.exists(self.base + ext):
                os.remove(self.base + ext)


def _megatron_indexed_dataset():
    """megatron-core's DType and IndexedDatasetBuilder, imported without its CPU-only warnings."""
    import logging
    import warnings

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    return DType, IndexedDatasetBuilder


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
    with open(path, encoding="utf-8") as f:
        summary = json.load(f)
    if summary.get("format") != SUMMARY_FORMAT:
        raise ConfigError(f"{path} is not a preprocessing summary ({SUMMARY_FORMAT}); check the path")
    return summary


def _write_json(path: str, content: dict) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
