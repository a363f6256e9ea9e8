"""gigatoken (optional, `pip install .[fast]`) for Hugging Face byte-level BPE tokenizers, where it
gives exactly the ids of the `tokenizers` library.

gigatoken (a Rust tokenizer, also behind Megatron-LM's tools/preprocess_data_fast.py) encodes about
16-20x faster than `tokenizers` on one core. It is used only for what it was checked to be exact on
(tests/unit/test_data_differential.py): a BPE model without byte fallback, dropout or subword
affixes, no normalizer, and a byte-level pre-tokenizer (GPT-2's, or a Split regex followed by
ByteLevel as in Llama-3) that gigatoken itself recognises (it refuses the rest). It reads a
special-token string in text as that special token, where the pipeline keeps text literal, so the
caller hands it only documents without such strings. Its encode caches grow without bound (about
7 MB per MB of never-seen words, measured): the encoder is rebuilt from the tokenizer.json after
every `reload_chars` characters, which bounds memory at the cost of a cold cache (~15 ms to build).

Shapes: N tokens, D texts.
"""

import json
from importlib import metadata
from typing import Optional, Sequence

import numpy as np

RELOAD_CHARS = 64 << 20


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


class GigatokenEncoder:
    """Encodes batches with gigatoken on the calling thread (preprocessing parallelises over
    processes), rebuilding it every `reload_chars` characters to bound its caches."""

    def __init__(self, tokenizer_json: bytes, reload_chars: int = RELOAD_CHARS) -> None:
        import gigatoken

        self._gigatoken = gigatoken
        self._json = tokenizer_json
        self._reload_chars = reload_chars
        self._since_reload = 0
        self._tok = gigatoken.Tokenizer.from_json(tokenizer_json)

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
        if self._since_reload > self._reload_chars:
            self._tok = self._gigatoken.Tokenizer.from_json(self._json)
            self._since_reload = 0
        self._since_reload += sum(map(len, texts))
        layout = self._tok.encode_batch(list(texts), parallel=False).layout
        offsets_D = np.asarray(layout.offsets.data)
        ids_N = np.asarray(layout.content.data)[offsets_D[0] : offsets_D[-1]]
        return ids_N, np.diff(offsets_D).astype(np.int64)
