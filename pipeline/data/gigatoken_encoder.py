"""gigatoken (optional, `pip install .[fast]`) for Hugging Face byte-level BPE tokenizers, where it
gives exactly the ids of the `tokenizers` library.

gigatoken (a Rust tokenizer, also behind Megatron-LM's tools/preprocess_data_fast.py) encodes about
16-20x faster than `tokenizers` on one core. It is used only for what it was checked to be exact on
(tests/unit/test_data_differential.py): a BPE model without byte fallback, dropout or subword
affixes, no normalizer, and a byte-level pre-tokenizer (GPT-2's, or a Split regex followed by
ByteLevel as in Llama-3) that gigatoken itself recognises (it refuses the rest). It reads a
special-token string in text as that special token, where the pipeline keeps text literal, so the
caller hands it only documents without such strings. Its encode caches grow without bound (about
7 MB per MB of never-seen words, measured): the encoder is rebuilt from the tokenizer.json once the
process has grown by `cache_bytes` since the last build (its resident size, from /proc), or after
`reload_chars` characters. A rebuild costs ~15 ms plus a cold cache: rebuilding every 64M characters
whatever the growth took 13% of the encoding time on the GPT-2 kind's 400 MB benchmark input
(3.51 vs 3.07 CPU-s), whose caches stay near 200 MB.

Shapes: N tokens, D texts.
"""

import json
import os
from importlib import metadata
from typing import Optional, Sequence

import numpy as np

RELOAD_CHARS = 1 << 30
"""Rebuild after this many characters whatever the growth (the bound where /proc is missing)."""
CACHE_BYTES = 512 << 20
"""Rebuild once the process has grown by this much since the last build."""


def gigatoken_version() -> Optional[str]:
    """The installed gigatoken's version, or None when it is not installed."""
    try:
        return metadata.version("gigatoken")
    except metadata.PackageNotFoundError:
        return None


def exact_for(spec: dict) -> bool:
    """Whether a tokenizer.json (parsed) is of the kind gigatoken is exact on (see the docstring)."""
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return (
        model.get("type") == "BPE"
        and not model.get("byte_fallback")
        and model.get("dropout") is None
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
        and spec.get("normalizer") is None
        and steps[-1].get("type") == "ByteLevel"
        and all(step.get("type") == "Split" for step in steps[:-1])
    )


def resident_bytes() -> Optional[int]:
    """This process's resident memory (Linux /proc), or None where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class GigatokenEncoder:
    """Encodes batches with gigatoken on the calling thread (preprocessing parallelises over
    processes), rebuilding it every `reload_chars` characters to bound its caches."""

    def __init__(self, tokenizer_json: bytes, reload_chars: int = RELOAD_CHARS, cache_bytes: int = CACHE_BYTES) -> None:
        import gigatoken

        self._gigatoken = gigatoken
        self._json = tokenizer_json
        self._reload_chars = reload_chars
        self._cache_bytes = cache_bytes
        self._build()

    def _build(self) -> None:
        self._tok = self._gigatoken.Tokenizer.from_json(self._json)
        self._since_reload = 0
        self._resident_at_build = resident_bytes()

    @classmethod
    def load(cls, tokenizer_json: bytes, reload_chars: int = RELOAD_CHARS) -> Optional["GigatokenEncoder"]:
        """An encoder for this tokenizer.json, or None when gigatoken is missing or not exact for it."""
        if gigatoken_version() is None or not exact_for(json.loads(tokenizer_json)):
            return None
        try:
            encoder = cls(tokenizer_json, reload_chars)
        except Exception:  # gigatoken refuses configurations it has no exact implementation of
            return None
        return encoder if type(encoder._tok.backend).__name__ == "BPETokenizer" else None

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids_N as uint32, lengths_D): the texts' ids concatenated, and how many each has."""
        resident = resident_bytes() if self._resident_at_build is not None else None
        if self._since_reload > self._reload_chars or (
                resident is not None and resident - self._resident_at_build > self._cache_bytes):
            self._build()
        self._since_reload += sum(map(len, texts))
        layout = self._tok.encode_batch(list(texts), parallel=False).layout
        offsets_D = np.asarray(layout.offsets.data)
        ids_N = np.asarray(layout.content.data)[offsets_D[0] : offsets_D[-1]]
        return ids_N, np.diff(offsets_D).astype(np.int64)
