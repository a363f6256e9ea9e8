"""Document lengths of preprocessed datasets: what long-context training can draw from a blend.

    python -m pipeline.data lengths data/build/corpus_text_document data/build/corpus_modules_document
    python -m pipeline.data lengths --config +experiment=phased_dev     # per phase of a training config

Tokens per document as stored (BOS/EOD included), read from each shard's .idx (4 bytes a document,
so a report costs little whatever the dataset's size). Preprocessing writes the report of its output
into the summary (`document_lengths` in PREFIX.json) and prints it. A blend's share of tokens in
documents of at least L tokens is the weighted mean of its components' shares: megatron draws a
component's samples in proportion to its weight, each a window of its tokens.
"""

import os
import struct
from typing import Optional

import numpy as np

from pipeline.data import shards
from pipeline.errors import DataError

THRESHOLDS = (4096, 16384, 65536)
"""Lengths (tokens) whose share of tokens a report always gives: typical long-context stages."""


def read_lengths(base: str) -> np.ndarray:
    """Tokens per document of the megatron-core indexed dataset `base`.bin/.idx (int64)."""
    path = base + ".idx"
    try:
        with open(path, "rb") as f:
            header = f.read(shards.IDX_HEADER.size)
            sequences = shards.IDX_HEADER.unpack(header)[3]
            lengths = np.fromfile(f, dtype="<i4", count=sequences)
    except (OSError, struct.error) as error:
        raise DataError(f"{path} cannot be read ({error}); rebuild the dataset") from None
    if lengths.size != sequences:
        raise DataError(f"{path} is truncated ({lengths.size} of {sequences} lengths); rebuild the dataset")
    return lengths.astype(np.int64)


def dataset_lengths(prefix: str) -> np.ndarray:
    """Tokens per document of a preprocessing output (all its shards) or a plain megatron prefix."""
    summary = shards.read_summary(prefix)
    if summary is None:
        if not os.path.exists(prefix + ".idx"):
            raise DataError(f"{prefix}: no dataset there (neither {prefix}.json nor {prefix}.idx); check the path")
        return read_lengths(prefix)
    directory = os.path.dirname(prefix)
    parts = [read_lengths(os.path.join(directory, s["prefix"])) for s in summary["shards"] if s["documents"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def report(lengths: np.ndarray, thresholds: tuple[int, ...] = THRESHOLDS) -> dict:
    """count, tokens, mean, p50/p90/p99, max, and the share of tokens in documents >= each threshold."""
    tokens = int(lengths.sum())
    if not lengths.size:
        return {"documents": 0, "tokens": 0, "share_of_tokens_in_documents_at_least": {}}
    p50, p90, p99 = (int(v) for v in np.quantile(lengths, (0.5, 0.9, 0.99), method="inverted_cdf"))
    ordered = np.sort(lengths)
    # Tokens in documents shorter than t: the prefix sum up to the first document >= t.
    below = np.concatenate([[0], np.cumsum(ordered)])[np.searchsorted(ordered, thresholds)]
    return {
        "documents": int(lengths.size), "tokens": tokens, "mean": round(tokens / lengths.size, 1),
        "p50": p50, "p90": p90, "p99": p99, "max": int(ordered[-1]),
        "share_of_tokens_in_documents_at_least": {str(t): round(1 - int(b) / tokens, 4)
                                                  for t, b in zip(thresholds, below)},
    }


def prefix_report(prefix: str, thresholds: tuple[int, ...] = THRESHOLDS) -> dict:
    """The report of one dataset: its summary's when it has one for these thresholds, else computed."""
    summary = shards.read_summary(prefix)
    stored = (summary or {}).get("document_lengths")
    if stored and set(stored["share_of_tokens_in_documents_at_least"]) >= {str(t) for t in thresholds}:
        return stored
    return report(dataset_lengths(prefix), thresholds)


def blend_share(reports: list[dict], weights: list[float], length: int) -> float:
    """Share of a blend's training tokens that come from documents >= `length` tokens."""
    total = sum(weights)
    return sum(w / total * r["share_of_tokens_in_documents_at_least"].get(str(length), 0.0)
               for r, w in zip(reports, weights))


def format_report(name: str, rep: dict) -> str:
    """One line: `name: N documents, T tokens; tokens/doc mean .. p50 .. p90 .. p99 .. max ..; >= 4096: x%`."""
    if not rep["documents"]:
        return f"{name}: no documents"
    shares = ", ".join(f">= {int(t):,}: {s:.1%}" for t, s in rep["share_of_tokens_in_documents_at_least"].items())
    return (f"{name}: {rep['documents']:,} documents, {rep['tokens']:,} tokens; tokens/document mean "
            f"{rep['mean']:,.0f}, p50 {rep['p50']:,}, p90 {rep['p90']:,}, p99 {rep['p99']:,}, max {rep['max']:,}; "
            f"share of tokens in documents {shares}")


def phase_lines(data, seq_length: int, iters: int, thresholds: tuple[int, ...] = THRESHOLDS) -> list[str]:
    """The report of every phase of a run's `data` config (one implicit phase without data.phases) at
    train.seq_length / train.iters: each component, then the blend's share of tokens in long documents,
    at the phase's sequence length too."""
    from pipeline.data.phases import resolve_phases

    lines = []
    phases = resolve_phases(data.phases, data.paths, data.weights, seq_length, iters)
    for phase in phases:
        lengths = tuple(sorted({*thresholds, phase.seq_length}))
        reports = [prefix_report(path, lengths) for path in phase.paths]
        title = f"phase {phase.name}" if phase.name else "data.paths"
        lines.append(f"{title} (steps {phase.start}-{phase.end - 1}, seq_length {phase.seq_length}):")
        lines += [f"  {format_report(f'{path} x{w:g}', r)}" for path, w, r in zip(phase.paths, phase.weights, reports)]
        shares = ", ".join(f">= {t:,}: {blend_share(reports, list(phase.weights), t):.1%}" for t in lengths)
        lines.append(f"  blend: share of tokens in documents {shares}")
    return lines


def summary_lengths(prefix: str, records: list[dict], thresholds: Optional[tuple[int, ...]] = None) -> dict:
    """The report for a preprocessing output whose shard `records` are written under `prefix`'s directory."""
    directory = os.path.dirname(prefix)
    parts = [read_lengths(os.path.join(directory, r["prefix"])) for r in records if r["documents"]]
    return report(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64), thresholds or THRESHOLDS)
