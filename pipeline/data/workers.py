"""The tokenizing worker processes of preprocessing, which never outlive the run that started them.

A worker blocked on its task queue would wait forever once its parent is killed (kill -9, OOM
killer): on Linux the kernel kills each worker when the parent dies (`processes.die_with_parent`).
"""

from typing import Optional

from pipeline.data.records import ChunkResult, encode_chunk
from pipeline.processes import die_with_parent


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
