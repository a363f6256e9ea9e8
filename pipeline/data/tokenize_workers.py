"""The tokenizing worker processes of preprocessing, which never outlive the run that started them.

Each worker parses a chunk into documents (pipeline.data.record_parsing) and tokenizes them. A
worker blocked on its task queue would wait forever once its parent is killed (kill -9, OOM
killer): on Linux the kernel kills each worker when the parent dies (`processes.die_with_parent`).
"""

from collections import Counter
from dataclasses import dataclass
from typing import Optional

import numpy as np

from pipeline.data.record_parsing import parse_chunk
from pipeline.processes import die_with_parent


@dataclass
class ChunkResult:
    """What a worker sends back for one chunk: tokens (EOD after each document) and bookkeeping."""

    index: int
    size: int
    tokens: np.ndarray
    lengths: np.ndarray
    skipped: Counter
    examples: dict[str, list[str]]
    first_bad: Optional[str]
    special_documents: int = 0
    """Documents containing a special-token string (kept as literal text)."""


def encode_chunk(chunk, tokenizer, dtype, text_key: str, max_chars: int, template: bool = False) -> ChunkResult:
    """Parse and tokenize `chunk`; each document's ids (inside the tokenizer's template when
    `template`) are followed by the tokenizer's EOD."""
    parsed = parse_chunk(chunk, text_key, max_chars)
    literal_D = tokenizer.special_documents(parsed.texts)  # once: the HF encoder needs it too
    tokens_N, lengths_D = tokenizer.encode_flat(parsed.texts, dtype=dtype, template=template, literal_D=literal_D)
    return ChunkResult(
        index=chunk.index,
        size=chunk.size,
        tokens=tokens_N,
        lengths=lengths_D.astype(np.int32),
        skipped=parsed.skipped,
        examples=parsed.examples,
        first_bad=parsed.first_bad,
        special_documents=int(literal_D.sum()),
    )


class Worker:
    """Per-process state of a preprocessing worker: the tokenizer, loaded once in each process."""

    current: Optional["Worker"] = None

    def __init__(self, tokenizer_path: str, dtype, text_key: str, max_chars: int, template: bool) -> None:
        from pipeline.data.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_path)
        self.dtype = dtype
        self.text_key = text_key
        self.max_chars = max_chars
        self.template = template

    @classmethod
    def start(cls, parent_pid: int, *args) -> None:
        """Pool initializer: tie the process's life to the parent's, then load the tokenizer."""
        die_with_parent(parent_pid)
        cls.current = cls(*args)

    @classmethod
    def run(cls, chunk) -> ChunkResult:
        """Pool task: encode one chunk with this process's worker."""
        self = cls.current
        return encode_chunk(chunk, self.tokenizer, self.dtype, self.text_key, self.max_chars, self.template)
