"""Input discovery and chunking (the reading side of preprocessing; runs in the main process).

Inputs are files, directories (searched recursively, sorted) or globs of: jsonl / ndjson (optionally
.gz or .zst), parquet, plain text (.txt/.md, optionally .gz/.zst; one document per file) and local
Hugging Face `datasets` directories (`save_to_disk` output of one split). Each input is cut into
`Chunk`s of about `chunk_bytes` of text. Chunk boundaries depend only on the inputs and `chunk_bytes`
(never on the number of workers), which is what makes the output identical for any worker count.
An input that cannot be read becomes an `error` chunk, counted as `unreadable_file`; a compressed
input that is truncated or damaged, as `corrupt_file` (gzip and zstd streams are checked to end
with their end-of-stream marker: a cut file would otherwise end in a silently half-read record).
"""

import glob
import io
import os
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

from pipeline.data.record_parsing import missing_field_detail, parse_chunk
from pipeline.errors import ConfigError, DataError

FORMATS = ("jsonl", "parquet", "text", "hf_dataset")
EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".txt": "text",
    ".md": "text",
}
COMPRESSIONS = (".gz", ".zst")
PARQUET_BATCH_ROWS = 1024
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Source:
    """One input file (or HF datasets directory) and its format."""

    path: str
    format: str

    @property
    def compression(self) -> Optional[str]:
        ext = os.path.splitext(self.path)[1]
        return ext if ext in COMPRESSIONS else None


@dataclass
class Chunk:
    """A piece of input handed to one worker.

    kind: `jsonl` (data: raw bytes of whole lines; first: line number of the first),
    `values` (data: the text field of consecutive rows; first: row number of the first),
    `files` (data: [(path, raw bytes)], one document per file) or `error` (data: why the file
    could not be read; first: the line/row where reading stopped; reason: the records.REASONS entry).
    size: bytes (jsonl/files) or characters (values) of input; shard boundaries are counted in it.
    """

    kind: str
    path: str
    first: int
    data: Union[bytes, list, str]
    size: int
    index: int = -1
    reason: str = "unreadable_file"


class CorruptInput(Exception):
    """A compressed input is truncated or its data is damaged."""


class MissingColumn(Exception):
    """A parquet file or HF dataset has no column named by --text-key."""


def discover(inputs: list[str], fmt: Optional[str] = None) -> list[Source]:
    """The sources named by `inputs` (files, directories, globs), in a deterministic order.

    `fmt` forces the format of every file (for names without a known extension).
    """
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"--format={fmt!r}; use one of {', '.join(FORMATS)}")
    sources: list[Source] = []
    for pattern in inputs:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(os.path.exists(m) or os.path.islink(m) for m in matches):
            raise DataError(f"input {pattern} does not exist; give files, directories or globs")
        for match in matches:
            sources.extend(_expand(match, fmt, explicit=not os.path.isdir(match)))
    unique = list(dict.fromkeys(sources))
    if not unique:
        raise DataError(
            f"no input files found in {' '.join(inputs)}; supported: "
            f"{', '.join(sorted(EXTENSIONS))} (optionally {'/'.join(COMPRESSIONS)}), HF datasets dirs"
        )
    return unique


def _expand(path: str, fmt: Optional[str], explicit: bool) -> list[Source]:
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_dict.json")):
            raise DataError(
                f"{path} is a DatasetDict; pass one split's directory, e.g. {os.path.join(path, 'train')}"
            )
        if os.path.exists(os.path.join(path, "state.json")):
            return [Source(path, "hf_dataset")]
        found = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                found.extend(_expand(os.path.join(root, name), fmt, explicit=False))
        return found
    detected = fmt or _format_of(path)
    if detected is None:
        if explicit:
            raise DataError(
                f"cannot tell the format of {path}; name it .jsonl/.parquet/.txt or pass --format"
            )
        return []
    return [Source(path, detected)]


def _format_of(path: str) -> Optional[str]:
    stem, ext = os.path.splitext(path)
    if ext in COMPRESSIONS:
        ext = os.path.splitext(stem)[1]
    return EXTENSIONS.get(ext)


def input_bytes(sources: list[Source]) -> Optional[int]:
    """Total bytes the chunks of `sources` will report, when known without reading them (plain files)."""
    total = 0
    for source in sources:
        if source.compression or source.format in ("parquet", "hf_dataset"):
            return None
        total += os.path.getsize(source.path) if os.path.isfile(source.path) else 0
    return total


def iter_chunks(sources: list[Source], chunk_bytes: int, text_key: str) -> Iterator[Chunk]:
    """All chunks of all sources, numbered from 0 in input order."""
    for index, chunk in enumerate(_all_chunks(sources, chunk_bytes, text_key)):
        chunk.index = index
        yield chunk


def _all_chunks(sources: list[Source], chunk_bytes: int, text_key: str) -> Iterator[Chunk]:
    # Text files are one document each: consecutive ones are grouped into chunks of ~chunk_bytes.
    files: list[tuple[str, bytes]] = []
    size = 0
    for source in sources:
        if files and (source.format != "text" or size >= chunk_bytes):
            yield Chunk("files", files[0][0], 1, files, size)
            files, size = [], 0
        if source.format != "text":
            yield from _chunks_of(source, chunk_bytes, text_key)
            continue
        try:
            data = _read_all(source)
        except Exception as error:  # any open/read/decompress failure makes the file unreadable
            if files:
                yield Chunk("files", files[0][0], 1, files, size)
                files, size = [], 0
            yield _error_chunk(source.path, 1, error)
            continue
        files.append((source.path, data))
        size += len(data)
    if files:
        yield Chunk("files", files[0][0], 1, files, size)


def iter_texts(inputs: list[str], text_key: str = "text", chunk_bytes: int = 1 << 20) -> Iterator[str]:
    """The valid document texts of `inputs`, in order (bad records are skipped silently: for training
    a tokenizer; preprocessing counts and reports them)."""
    for chunk in iter_chunks(discover(inputs), chunk_bytes, text_key):
        yield from parse_chunk(chunk, text_key).texts


def _chunks_of(source: Source, chunk_bytes: int, text_key: str) -> Iterator[Chunk]:
    if source.format == "jsonl":
        yield from _jsonl_chunks(source, chunk_bytes)
    elif source.format == "parquet":
        yield from _value_chunks(source, _parquet_batches(source.path, text_key), chunk_bytes)
    else:
        yield from _value_chunks(source, _hf_batches(source.path, text_key), chunk_bytes)


def _open(source: Source) -> io.BufferedIOBase:
    if source.compression == ".gz":
        return io.BufferedReader(_Decompressing(source.path, lambda: zlib.decompressobj(wbits=31)))
    if source.compression == ".zst":
        import zstandard

        return io.BufferedReader(_Decompressing(source.path, zstandard.ZstdDecompressor().decompressobj))
    return open(source.path, "rb")


class _Decompressing(io.RawIOBase):
    """The decompressed bytes of a gzip or zstd file of one or more members (frames), raising
    CorruptInput at the end when the last member is cut short, or when the data is damaged."""

    BLOCK = 1 << 14  # compressed bytes per step: data decoded in a step that hits damage is lost

    def __init__(self, path: str, new_decompressor: Callable) -> None:
        self.file = open(path, "rb")
        self.new_decompressor = new_decompressor
        self.decompressor = new_decompressor()
        self.started = False  # bytes went into the current member
        self.pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            raw = self.file.read(self.BLOCK)
            if not raw:
                if self.started and not self.decompressor.eof:
                    raise CorruptInput("truncated: the file ends inside its compressed data")
                return 0
            self.pending = self._decompress(raw)
        size = min(len(buffer), len(self.pending))
        buffer[:size] = self.pending[:size]
        self.pending = self.pending[size:]
        return size

    def _decompress(self, raw: bytes) -> bytes:
        out = []
        while raw:
            if self.decompressor.eof:  # the next member starts here
                self.decompressor = self.new_decompressor()
            self.started = True
            try:
                out.append(self.decompressor.decompress(raw))
            except Exception as error:  # zlib.error, zstandard.ZstdError: damaged data
                raise CorruptInput(f"damaged compressed data ({_describe(error)})") from None
            raw = self.decompressor.unused_data if self.decompressor.eof else b""
        return b"".join(out)

    def close(self) -> None:
        self.file.close()
        super().close()


def _read_all(source: Source) -> bytes:
    with _open(source) as f:
        return f.read()


def _jsonl_chunks(source: Source, chunk_bytes: int) -> Iterator[Chunk]:
    line = 1
    try:
        with _open(source) as f:
            while True:
                data = f.read(chunk_bytes)
                if not data:
                    return
                if not data.endswith(b"\n"):
                    data += f.readline()
                size = len(data)
                if line == 1 and data.startswith(BOM):
                    data = data[len(BOM):]  # written by some Windows tools; not part of the JSON
                yield Chunk("jsonl", source.path, line, data, size)
                line += data.count(b"\n")
    except Exception as error:  # open/read/decompress failures: the rest of the file is unreadable
        yield _error_chunk(source.path, line, error)


def _value_chunks(source: Source, batches: Iterator[list], chunk_bytes: int) -> Iterator[Chunk]:
    row, values, size = 1, [], 0
    try:
        for batch in batches:
            values.extend(batch)
            size += sum(len(v) for v in batch if isinstance(v, (str, bytes)))
            if size >= chunk_bytes:
                yield Chunk("values", source.path, row, values, size)
                row, values, size = row + len(values), [], 0
    except Exception as error:  # unreadable or corrupt file: keep what was read, report the rest
        if values:
            yield Chunk("values", source.path, row, values, size)
        yield _error_chunk(source.path, row + len(values), error)
        return
    if values:
        yield Chunk("values", source.path, row, values, size)


def _parquet_batches(path: str, text_key: str) -> Iterator[list]:
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    if text_key not in file.schema_arrow.names:
        raise MissingColumn(missing_field_detail(text_key, file.schema_arrow.names, "column"))
    for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_key]):
        yield batch.column(0).to_pylist()


def _hf_batches(path: str, text_key: str) -> Iterator[list]:
    import datasets

    dataset = datasets.load_from_disk(path)
    if text_key not in dataset.column_names:
        raise MissingColumn(missing_field_detail(text_key, dataset.column_names, "column"))
    for batch in dataset.select_columns([text_key]).iter(batch_size=PARQUET_BATCH_ROWS):
        yield batch[text_key]


def _error_chunk(path: str, first: int, error: BaseException) -> Chunk:
    """The chunk that reports why reading `path` stopped at line/row `first`."""
    if isinstance(error, MissingColumn):
        return Chunk("error", path, first, str(error), 0, reason="missing_field")
    if isinstance(error, CorruptInput):
        return Chunk("error", path, first, str(error), 0, reason="corrupt_file")
    return Chunk("error", path, first, _describe(error), 0)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0]
