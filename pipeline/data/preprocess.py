"""Tokenize raw text into megatron-core indexed datasets (.bin/.idx shards plus a JSON summary).

    python -m pipeline.data preprocess --input 'dumps/*.jsonl.zst' --tokenizer data/build/tokenizer \\
        --output data/build/web_text_document [--workers 16] [--text-key text] [--on-error fail]

Flags:
  --input PATH...      files, directories (recursive) or globs: .jsonl/.ndjson (+.gz/.zst), .parquet,
                       .txt/.md (+.gz/.zst; one document per file), HF `save_to_disk` directories
  --output PREFIX      writes PREFIX_00000.bin/.idx ... and the summary PREFIX.json
  --tokenizer PATH     tokenizer.json, a HF tokenizer directory or a sentencepiece .model
  --text-key KEY       JSON/parquet/dataset field holding the text (default: text)
  --format FMT         force the input format: jsonl, parquet, text or hf_dataset
  --workers N          tokenizing processes (default: all cores); the output does not depend on it
  --chunk-mb MB        input handed to a worker at a time (default 1)
  --shard-mb MB        input per output shard (default 1024); resuming restarts at a shard
  --max-chars N        documents longer than this are skipped as too_long (default 10,000,000; 0: none)
  --on-error skip|fail skip bad records and report them (default), or stop at the first one
  --overwrite          replace an existing output (otherwise refused): the new dataset is built
                       aside and swapped in when complete, so a failed run keeps the old one
  --no-bos             do not add what a Hugging Face tokenizer's template adds around a document
                       (Llama-3's BOS); by default it is added, as Megatron-LM's preprocess_data.py does
  --no-progress        no progress bar

Errors (bad flags, unusable input, no documents, an output directory that cannot be written) exit
with status 2 and one line `error: ...` on stderr, leaving no dataset marked complete.
Every document gets the tokenizer's EOD appended. The token dtype follows the vocabulary (uint16
below 65500 ids, else int32). Bad records are counted by reason (see pipeline.data.record_parsing) with the
first few file:line locations, in the summary and on the console. A run killed midway resumes at the
first unfinished shard when started again with the same arguments; its workers die with it.
Test hook: with PIPELINE_PREPROCESS_KILL_AFTER_SHARDS=N the run SIGKILLs itself after N shards.
"""

import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Optional

from pipeline.data import lengths, shards
from pipeline.data.record_parsing import MAX_EXAMPLES, REASONS
from pipeline.data.sources import discover, input_bytes, iter_chunks
from pipeline.data.tokenize_workers import Worker
from pipeline.errors import ConfigError, DataError

MB = 1 << 20


class BadRecordError(DataError):
    """A bad input record in fail-fast mode; the message names the reason and file:line."""


@dataclass
class PreprocessOptions:
    """What to tokenize, with what, and where to write it (the command-line flags)."""

    inputs: list[str]
    output: str
    tokenizer: str
    text_key: str = "text"
    format: Optional[str] = None
    workers: int = 0
    """Tokenizing processes; 0 means os.cpu_count()."""
    chunk_mb: float = 1.0
    shard_mb: float = 1024.0
    max_chars: int = 10_000_000
    on_error: str = "skip"
    overwrite: bool = False
    progress: bool = True
    bos: bool = True
    """Wrap each document in the HF tokenizer's template (e.g. BOS first), as Megatron-LM does."""

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ConfigError(f"--workers={self.workers} must be >= 0 (0: all cores)")
        if self.chunk_mb <= 0 or self.shard_mb <= 0:
            raise ConfigError(f"--chunk-mb={self.chunk_mb} and --shard-mb={self.shard_mb} must be > 0")
        if self.shard_mb < self.chunk_mb:
            raise ConfigError(f"--shard-mb={self.shard_mb} is below --chunk-mb={self.chunk_mb}; raise it")
        if self.max_chars < 0:
            raise ConfigError(f"--max-chars={self.max_chars} must be >= 0 (0: no limit)")
        if self.on_error not in ("skip", "fail"):
            raise ConfigError(f"--on-error={self.on_error!r}; use skip or fail")
        if not self.inputs or not self.output:
            raise ConfigError("give --input and --output")

    @property
    def num_workers(self) -> int:
        return self.workers or os.cpu_count() or 1


@dataclass
class _Totals:
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    first_bad: Optional[str] = None
    special_documents: int = 0

    def add(self, documents: int, tokens: int, size: int, skipped: dict, examples: dict) -> None:
        self.documents += documents
        self.tokens += tokens
        self.input_bytes += size
        self.skipped.update(skipped)
        for reason, locations in examples.items():
            kept = self.examples.setdefault(reason, [])
            kept.extend(locations[: MAX_EXAMPLES - len(kept)])

    def add_result(self, result) -> None:
        """Count a worker's ChunkResult."""
        self.add(len(result.lengths), int(result.tokens.size), result.size, result.skipped,
                 result.examples)
        self.first_bad = self.first_bad or result.first_bad
        self.special_documents += result.special_documents

    def add_totals(self, other: "_Totals") -> None:
        self.add(other.documents, other.tokens, other.input_bytes, other.skipped, other.examples)
        self.first_bad = self.first_bad or other.first_bad
        self.special_documents += other.special_documents


class _Output:
    """The shards of one run: opened at their first chunk, finished (renamed, recorded in the
    progress file) at their last."""

    def __init__(self, prefix: str, fingerprint: str, vocab_size: int, done: list[dict]):
        self.prefix, self.fingerprint, self.vocab_size = prefix, fingerprint, vocab_size
        self.finished = list(done)
        self.totals = _Totals()
        for record in done:
            self.totals.add(record["documents"], record["tokens"], record["input_bytes"],
                            record["skipped"], record["examples"])
            self.totals.special_documents += record["special_documents"]
        self.writer: Optional[shards.ShardWriter] = None
        self.shard = _Totals()

    def add(self, shard: int, last: bool, result) -> None:
        if self.writer is None:
            self.writer = shards.ShardWriter(self.prefix, shard, self.vocab_size)
            self.shard = _Totals()
        self.writer.add(result.tokens, result.lengths, result.size)
        self.shard.add_result(result)
        if last:
            record = self.writer.finish()
            record.update(skipped=dict(self.shard.skipped), examples=self.shard.examples,
                          special_documents=self.shard.special_documents)
            self.writer = None
            self.finished.append(record)
            self.totals.add_totals(self.shard)
            shards.write_progress(self.prefix, self.fingerprint, self.finished)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def preprocess(opts: PreprocessOptions) -> dict:
    """Run preprocessing; return the summary (also written to `<output>.json`).

    Raises DataError (bad input, no documents), StorageError (output not writable) or ConfigError
    (bad options), leaving no dataset marked complete and an existing one untouched.
    """
    from pipeline.data.tokenizer import load_tokenizer

    shards.ensure_writable(opts.output)
    sources = discover(opts.inputs, opts.format)
    tokenizer = load_tokenizer(opts.tokenizer)
    fingerprint = _fingerprint(opts, sources, tokenizer.fingerprint)
    prefix, done = shards.prepare_output(opts.output, fingerprint, opts.overwrite)
    dtype = shards.token_dtype(tokenizer.vocab_size)
    plan = _plan(iter_chunks(sources, int(opts.chunk_mb * MB), opts.text_key), int(opts.shard_mb * MB))
    output = _Output(prefix, fingerprint, tokenizer.vocab_size, done)
    fresh = _Totals()  # this run's work, for the rates
    bar = _progress_bar(opts, sources)
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")  # workers import only what tokenizing needs
    initargs = (os.getpid(), opts.tokenizer, dtype, opts.text_key, opts.max_chars, opts.bos)
    with ProcessPoolExecutor(opts.num_workers, context, Worker.start, initargs) as pool:
        try:
            results = _ordered(pool, _not_done(plan, len(done), bar), window=4 * opts.num_workers)
            for (shard, last), result in results:
                if opts.on_error == "fail" and result.first_bad:
                    raise BadRecordError(f"bad input: {result.first_bad}; fix it or use --on-error skip")
                output.add(shard, last, result)
                fresh.add_result(result)
                bar.update(result.size)
                _show_rates(bar, fresh, time.perf_counter() - start)
        except BaseException:
            output.abort()
            pool.shutdown(cancel_futures=True)
            raise
        finally:
            bar.close()
    elapsed = time.perf_counter() - start
    summary = _summary(opts, tokenizer, dtype, output, fresh, elapsed, len(done))
    summary["document_lengths"] = lengths.summary_lengths(prefix, output.finished)
    _report(opts.output, summary)
    if not summary["documents"]:
        shards.discard(prefix)
        raise DataError(_no_documents(opts, summary, output.totals.first_bad))
    shards.write_summary(prefix, summary)
    if prefix != opts.output:
        shards.publish(prefix, opts.output)
    return summary


def _no_documents(opts: PreprocessOptions, summary: dict, first_bad: Optional[str]) -> str:
    skipped = sum(summary["skipped"].values())
    first = f" (first: {first_bad})" if first_bad else ""
    kept = "; the existing dataset is unchanged" if shards.read_summary(opts.output) else ""
    return (f"no documents in {' '.join(opts.inputs)}: {skipped} record(s) skipped{first}; fix the "
            f"input or --text-key and rerun{kept}")


def _plan(chunks: Iterator, shard_bytes: int) -> Iterator[tuple[int, bool, object]]:
    """(shard index, whether the chunk ends its shard, chunk): a shard closes once it holds
    `shard_bytes` of input, or at the end of the input."""
    shard, size = 0, 0
    previous = None
    for chunk in chunks:
        if previous is not None:
            yield shard, False, previous
        size += chunk.size
        if size >= shard_bytes:
            yield shard, True, chunk
            shard, size, previous = shard + 1, 0, None
        else:
            previous = chunk
    if previous is not None:
        yield shard, True, previous


def _not_done(plan, resumed: int, bar) -> Iterator:
    """The planned chunks of shards not finished by an earlier run (whose input is only counted)."""
    for shard, last, chunk in plan:
        if shard < resumed:
            bar.update(chunk.size)
        else:
            yield shard, last, chunk


def _ordered(pool, items, window: int):
    """Results of Worker.run over `items` in input order, with at most `window` chunks in flight
    (Pool.imap would read the whole input ahead into memory)."""
    pending = deque()
    for shard, last, chunk in items:
        pending.append(((shard, last), pool.submit(Worker.run, chunk)))
        if len(pending) >= window:
            key, future = pending.popleft()
            yield key, future.result()
    while pending:
        key, future = pending.popleft()
        yield key, future.result()


def _fingerprint(opts: PreprocessOptions, sources, tokenizer_fingerprint: str) -> str:
    """Identifies a run's inputs and output-affecting options, so that only the same run resumes."""
    files = []
    for source in sources:
        stat = os.stat(source.path)
        files.append([source.path, source.format, stat.st_size, stat.st_mtime_ns])
    key = {
        "format": shards.SUMMARY_FORMAT,
        "files": files,
        "tokenizer": tokenizer_fingerprint,
        "text_key": opts.text_key,
        "chunk_mb": opts.chunk_mb,
        "shard_mb": opts.shard_mb,
        "max_chars": opts.max_chars,
        "bos": opts.bos,
    }
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def _summary(opts, tokenizer, dtype, output: _Output, fresh: _Totals, elapsed, resumed) -> dict:
    finished, totals = output.finished, output.totals
    return {
        "complete": True,
        "tokenizer": tokenizer.describe(),
        "dtype": dtype.__name__,
        "text_key": opts.text_key,
        "inputs": opts.inputs,
        "shards": finished,
        "documents": totals.documents,
        "tokens": totals.tokens,
        "bos": opts.bos,
        "document_prefix": tokenizer.prefix if opts.bos else [],
        "document_suffix": (tokenizer.suffix if opts.bos else []) + [tokenizer.eod],
        "documents_with_special_token_strings": totals.special_documents,
        "input_bytes": totals.input_bytes,
        "output_bytes": sum(r["bin_bytes"] + r["idx_bytes"] for r in finished),
        "skipped": {reason: totals.skipped.get(reason, 0) for reason in REASONS},
        "skipped_examples": {r: totals.examples[r] for r in REASONS if r in totals.examples},
        "workers": opts.num_workers,
        "resumed_shards": resumed,
        "elapsed_s": round(elapsed, 3),
        "docs_per_s": round(fresh.documents / max(elapsed, 1e-9), 1),
        "tokens_per_s": round(fresh.tokens / max(elapsed, 1e-9), 1),
    }


def _progress_bar(opts: PreprocessOptions, sources):
    from tqdm import tqdm

    return tqdm(
        total=input_bytes(sources),
        unit="B",
        unit_scale=True,
        desc=os.path.basename(opts.output),
        disable=not opts.progress,
        dynamic_ncols=True,
    )


def _show_rates(bar, fresh: _Totals, elapsed: float) -> None:
    if elapsed > 0:
        rates = f"{fresh.documents / elapsed:,.0f} docs/s, {fresh.tokens / elapsed:,.0f} tokens/s"
        bar.set_postfix_str(rates, refresh=False)


def _report(prefix: str, summary: dict) -> None:
    print(
        f"{prefix}: {summary['documents']:,} documents, {summary['tokens']:,} tokens in "
        f"{len(summary['shards'])} shard(s); {summary['tokens_per_s']:,.0f} tokens/s over "
        f"{summary['elapsed_s']:.1f} s",
        file=sys.stderr,
    )
    for reason, count in summary["skipped"].items():
        if count:
            where = ", ".join(summary["skipped_examples"].get(reason, []))
            print(f"  skipped {count:,} {reason}: {where}{' ...' if count > MAX_EXAMPLES else ''}",
                  file=sys.stderr)
    if summary["documents"]:
        print(f"  {lengths.format_report('lengths', summary['document_lengths'])}", file=sys.stderr)
    if summary["documents_with_special_token_strings"]:
        print(f"  {summary['documents_with_special_token_strings']:,} documents contain special-token "
              f"strings, kept as literal text", file=sys.stderr)
