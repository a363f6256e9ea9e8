"""Export a pipeline checkpoint (any TP/PP/DP/EP layout) to a Hugging Face NemotronH directory.

    python pipeline/convert.py export runs/tiny OUT_DIR [--dtype bf16|fp32] [--overwrite]

Tensors are read straight from the torch_dist files (no process group, no model): the checkpoint
stores global tensors (Mamba components separately) as chunks with global offsets, listed in the
`torch.distributed.checkpoint` metadata, so any TP/PP/DP/EP layout can be assembled
(`pipeline.checkpoint.CheckpointTensors`). Every conversion only moves elements (`Conversion.pieces`),
so when the dtype does not change and a tensor's chunks are plain blocks of rows, its HF bytes are
copied file to file as byte ranges, as `cp` does (8B benchmark: 1.4-1.5x the time of `cp` when
read into memory and written back, about the time of `cp` when copied). The rest (dtype casts,
row-parallel TP shards) is computed in memory while a reader thread fetches the next tensors, so
peak memory is a few tensors (the largest is the embedding) whatever the model size. Everything is
written to a temporary sibling directory and renamed into place at the end.
"""

import dataclasses
import json
import os
import queue
import shutil
import threading
import time
import warnings
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from pipeline.checkpoint import CheckpointTensors
from pipeline.errors import CheckpointError, ConversionError
from pipeline.fs import overlaps, replace_dir, temporary_sibling
from pipeline.hf.config import hf_config, moe_export_notes, moe_export_refusal
from pipeline.hf.mapping import Conversion, conversions, megatron_shapes
from pipeline.hf.safetensors_io import ShardWriter, plan_shards, shard_file_names, write_index
from pipeline.model.config import ModelConfig
from pipeline.model.params import EMBEDDING

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_SHARD_BYTES = 5 * 2**30


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote."""

    out_dir: Path
    checkpoint: Path
    dtype: str
    tensors: int
    weight_bytes: int
    """Bytes of tensor data in the safetensors shards."""
    bytes_written: int
    """Bytes of every file written (shards, configs, tokenizer)."""
    copied_tensors: int
    """HF tensors copied file to file as byte ranges (the others were computed in memory)."""
    seconds: float
    notes: list[str] = dataclasses.field(default_factory=list)
    """Where transformers computes slightly differently from the pipeline (`moe_export_notes`)."""


def check_shapes(model: ModelConfig, found: dict[str, tuple[int, ...]], where: Path) -> None:
    """Every tensor the model needs (the routers' expert bias too) is in the checkpoint with the shape
    the model config implies."""
    for key, shape in megatron_shapes(model).items():
        if key not in found:
            raise CheckpointError(
                f"checkpoint {where} has no tensor {key}, which model {model.name!r} (pattern "
                f"{model.pattern!r}) needs; was it written by this pipeline with this model config?"
            )
        if found[key] != shape:
            raise CheckpointError(
                f"checkpoint tensor {key} has shape {list(found[key])} but the model config in meta.json "
                f"implies {list(shape)}; the checkpoint and its meta.json disagree"
            )


def check_out_dir(out_dir: Path, overwrite: bool, source: Path) -> Path:
    """Where OUT_DIR really is (links resolved, so that the replace swaps the directory the link points
    to, not the link). It must be absent, empty, or replaced with --overwrite, and must neither equal,
    contain nor sit inside `source` (replacing it would delete the input)."""
    if overlaps(out_dir, source):
        raise ConversionError(
            f"output {out_dir} overlaps the input {source} (the same directory, inside it or containing it); "
            f"choose an output outside {Path(source).resolve()}"
        )
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise ConversionError(f"output {out_dir} exists and is not a directory; choose another path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConversionError(f"output directory {out_dir} is not empty; pass --overwrite to replace it")
    return out_dir


def load_export_tokenizer(path: str | None, ckpt_dir: Path):
    """The tokenizer to ship with the model: `path`, else the one recorded in the checkpoint."""
    from pipeline.data.tokenizer import load_tokenizer

    if not path:
        raise ConversionError(
            f"checkpoint {ckpt_dir} records no tokenizer; pass --tokenizer PATH (a tokenizer.json, HF "
            f"tokenizer directory or sentencepiece .model)"
        )
    if not os.path.exists(path):
        raise ConversionError(
            f"tokenizer {path} (recorded in {ckpt_dir}/meta.json) does not exist here; pass --tokenizer PATH"
        )
    return load_tokenizer(path)


def _runs(ranges: list[tuple[int, int, int]], start: int, length: int) -> list[tuple[int, int, int]]:
    """The (fd, offset, length) runs holding bytes [start, start + length) of the data that `ranges` lay out."""
    out, position = [], 0
    for fd, offset, size in ranges:
        lo, hi = max(start, position), min(start + length, position + size)
        if lo < hi:
            out.append((fd, offset + lo - position, hi - lo))
        position += size
    return out


def copy_plan(conversion: Conversion, byte_ranges, dtype: torch.dtype) -> list[list[tuple[int, int, int]]] | None:
    """For each HF tensor of `conversion`, the byte runs to copy it from, when every input is stored
    in the output dtype (`dtype` unless the conversion fixes its own) with known byte ranges
    (`byte_ranges(key, dtype)`); None when it must be computed."""
    dtype = conversion.dtype or dtype
    inputs = [byte_ranges(key, dtype) for key, _ in conversion.megatron]
    if not inputs or any(ranges is None for ranges in inputs):
        return None
    size = dtype.itemsize
    return [
        [run for i, first, count in pieces for run in _runs(inputs[i], first * size, count * size)]
        for pieces in conversion.pieces()
    ]


def write_hf_weights(
    model: ModelConfig,
    get,
    out_dir: Path,
    dtype: torch.dtype,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    byte_ranges=None,
) -> tuple[int, int, int]:
    """Write the HF tensors of `model` into safetensors shards plus their index in `out_dir`; returns
    (tensor count, bytes of tensor data, tensors copied as byte ranges).

    `get(key)` gives a full megatron tensor. With `byte_ranges(key, dtype)` (where the key's bytes lie
    on disk, None if not stored plainly in `dtype`), conversions that only move bytes are copied
    file to file, as `cp` would; the others are computed in memory.
    """
    conversions_ = conversions(model)
    plans = [copy_plan(c, byte_ranges, dtype) if byte_ranges else None for c in conversions_]
    outputs = {}  # HF name -> byte runs to copy, or None (computed)
    for c, plan in zip(conversions_, plans, strict=True):
        outputs.update(zip((name for name, _ in c.hf), plan or [None] * len(c.hf), strict=True))

    def computed():
        for c, plan in zip(conversions_, plans, strict=True):
            if plan is None:
                tensors = c.to_hf([get(key) for key, _ in c.megatron])
                yield from zip((name for name, _ in c.hf), tensors, strict=True)

    entries = [(name, shape, c.dtype or dtype) for c in conversions_ for name, shape in c.hf]
    shards = plan_shards(entries, max_shard_bytes)
    names = shard_file_names(len(shards))
    weight_map = {name: file for file, shard in zip(names, shards, strict=True) for name, _, _ in shard}
    total = copied = 0
    # Reading and converting the next computed tensors overlaps writing: reading costs about as much as
    # writing (8B benchmark); two tensors ahead keeps peak memory at a few tensors.
    with closing(prefetch(computed(), depth=2)) as stream:
        for file, shard in zip(names, shards, strict=True):
            writer = ShardWriter(out_dir / file, shard)
            for name, shape, _ in shard:
                if outputs[name] is not None:
                    writer.copy(name, shape, outputs[name])
                    copied += 1
                    continue
                streamed, tensor = next(stream)
                writer.write(streamed, tensor)
                del tensor
            writer.close()
            total += writer.data_bytes
    write_index(out_dir, weight_map, total)
    return len(weight_map), total, copied


def model_config_from_meta(fields: dict) -> ModelConfig:
    """The ModelConfig recorded in a checkpoint's meta.json (fields this version does not know are ignored)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in fields.items() if k in known})


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch(items: Iterator, depth: int) -> Iterator:
    """Yield from `items`, which a background thread produces up to `depth` items ahead. An error in
    the producer is raised here; closing this generator stops the producer."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            put(_Failure(error))

    thread = threading.Thread(target=produce, name="hf-export-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is done:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


def write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    dtype: str | None = None,
    overwrite: bool = False,
    tokenizer: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    copy: bool = True,
) -> ExportResult:
    """Export the newest complete checkpoint at `checkpoint` (run dir, checkpoints dir or step dir)
    to an HF directory `out_dir`. `dtype` bf16/fp32 (default: the checkpoint's weight dtype).
    `copy=False` computes every tensor in memory instead of copying byte ranges where it can.

    Every check runs before anything is written; a failure leaves `out_dir` untouched.
    """
    from pipeline.checkpoint import resolve_checkpoint

    start = time.perf_counter()
    ckpt_dir = resolve_checkpoint(checkpoint)
    reader = CheckpointTensors(ckpt_dir)
    meta = reader.meta
    out_dir = check_out_dir(Path(out_dir), overwrite, Path(checkpoint))
    model = model_config_from_meta(meta.model)
    moe_export_refusal(model)
    check_shapes(model, reader.shapes, ckpt_dir)
    if dtype is None:
        dtype = "bf16" if reader.dtypes[EMBEDDING] == torch.bfloat16 else "fp32"
    if dtype not in TORCH_DTYPES:
        raise ConversionError(f"--dtype {dtype!r}; use bf16 or fp32")
    tok = load_export_tokenizer(tokenizer or meta.tokenizer, ckpt_dir)
    if tok.vocab_size > model.vocab_size:
        raise ConversionError(
            f"tokenizer has {tok.vocab_size} tokens but the model only {model.vocab_size}; pass the "
            f"tokenizer the model was trained with (--tokenizer)"
        )
    ids = dict(bos_token_id=tok.bos, eos_token_id=tok.eod, pad_token_id=tok.pad)

    tmp = temporary_sibling(out_dir)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            tensors, weight_bytes, copied = write_hf_weights(
                model, reader.get, tmp, TORCH_DTYPES[dtype], max_shard_bytes, reader.byte_ranges if copy else None
            )
        write_json(tmp / "config.json", hf_config(model, dtype, **ids))
        write_json(tmp / "generation_config.json", {k: v for k, v in ids.items() if v is not None})
        tok.save_hf(str(tmp))
        written = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        reader.close()
    return ExportResult(
        out_dir=out_dir,
        checkpoint=ckpt_dir,
        dtype=dtype,
        tensors=tensors,
        weight_bytes=weight_bytes,
        bytes_written=written,
        copied_tensors=copied,
        seconds=time.perf_counter() - start,
        notes=moe_export_notes(model),
    )
