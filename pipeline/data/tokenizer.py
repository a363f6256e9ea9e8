"""Tokenizers from local files: Hugging Face `tokenizer.json` (or a directory) and sentencepiece `.model`.

One small interface for the rest of the pipeline (`vocab_size`, `eod`, `pad`, `bos`, `encode`,
`encode_flat`, `decode`, `save_hf`, `fingerprint`); nothing is ever downloaded. Train or inspect one
with `python -m pipeline.data tokenizer`.

Which file is loaded: a path ending in `.model` is sentencepiece; a `tokenizer.json` file or a directory
holding one is Hugging Face (a directory with only `tokenizer.model` is sentencepiece).

What is written per document (`encode_flat`), as Megatron-LM's tools/preprocess_data.py writes it:
the text's ids, wrapped in what the tokenizer's template adds to one sequence when `template` is on
(a Hugging Face post-processor such as Llama-3's, which puts BOS first; sentencepiece models have
none, and Megatron-LM adds none for them), then the EOD. Document text is encoded literally: a
special-token string such as "</s>" inside a document stays text, so data cannot inject control
tokens (Megatron-LM's tool turns it into the special token); `special_documents` finds such texts.

Encoders: sentencepiece through the word cache (pipeline.data.word_cache) where it is exact, else the
library; Hugging Face through gigatoken where it is exact (pipeline.data.gigatoken_encoder), else `tokenizers`.
All give the libraries' ids exactly.

Shapes: N tokens, D texts.
"""

import hashlib
import json
import os
import re
import stat
from functools import cached_property
from typing import Iterable, Optional, Sequence

import numpy as np

from pipeline.data.gigatoken_encoder import RELOAD_CHARS, GigatokenEncoder, gigatoken_version
from pipeline.data.sentencepiece_model import sentencepiece_to_hf, special_strings, unknown_to_merge, word_rule
from pipeline.data.word_cache import WORD_LIMIT, WordCache
from pipeline.errors import ConfigError

HF_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")
MAX_FILE_BYTES = 1 << 30
"""Largest tokenizer file read (1 GiB; published tokenizer.json files are under 40 MB, .model files
under 10 MB): a hostile path (a huge file, /dev/zero) is refused instead of read until memory runs out."""


class Tokenizer:
    """The interface every tokenizer implements. Ids of special tokens are None when absent (not eod).
    `prefix`/`suffix`: the ids the tokenizer's template puts around one sequence (often none)."""

    kind: str
    encoder: str
    path: str
    vocab_size: int
    eod: int
    pad: Optional[int]
    bos: Optional[int]
    prefix: list[int] = []
    suffix: list[int] = []
    special_strings: list[str]

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without template or EOD."""
        ids_N, lengths_D = self._encode_ids(texts)
        return [ids.tolist() for ids in np.split(ids_N, np.cumsum(lengths_D)[:-1])] if len(texts) else []

    def _encode_ids(self, texts: Sequence[str],
                    literal_D: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids_N, lengths_D): the texts' ids concatenated, and how many each has. `literal_D`:
        `special_documents(texts)` when the caller has it already."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids (special tokens dropped)."""
        raise NotImplementedError

    def tokens(self) -> list[str]:
        """The token string of every id, in id order."""
        raise NotImplementedError

    def save_hf(self, directory: str) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json to `directory`."""
        raise NotImplementedError

    def encode_flat(self, texts: Sequence[str], dtype=np.int64, template: bool = False,
                    literal_D: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """(tokens_N, lengths_D): each text's ids (inside `prefix`/`suffix` when `template`)
        followed by EOD, all concatenated, and each document's length (EOD included). `literal_D`:
        `special_documents(texts)` when the caller has it already (preprocessing counts them too)."""
        ids_N, lengths_D = self._encode_ids(texts, literal_D)
        before, after = (self.prefix, self.suffix) if template else ([], [])
        return wrap(ids_N, lengths_D, before, after + [self.eod], dtype)

    def special_documents(self, texts: Sequence[str]) -> np.ndarray:
        """bool_D: which texts contain one of `special_strings` (kept as literal text)."""
        pattern = self._special_pattern
        if pattern is None or pattern.search("".join(texts)) is None:  # one scan: almost always none
            return np.zeros(len(texts), dtype=bool)
        return np.fromiter((pattern.search(t) is not None for t in texts), dtype=bool, count=len(texts))

    @cached_property
    def _special_pattern(self) -> Optional[re.Pattern]:
        strings = sorted(self.special_strings, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, strings))) if strings else None

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the vocabulary (every token string by id) and the EOD id: equal for a
        sentencepiece model and its Hugging Face conversion, different for any other vocabulary."""
        payload = json.dumps({"tokens": self.tokens(), "eod": self.eod}, ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def describe(self) -> dict:
        """What preprocessing records about the tokenizer in its summary JSON."""
        return {
            "kind": self.kind,
            "path": self.path,
            "vocab_size": self.vocab_size,
            "eod": self.eod,
            "bos": self.bos,
            "template_prefix": self.prefix,
            "template_suffix": self.suffix,
            "encoder": self.encoder,
            "fingerprint": self.fingerprint,
        }


def wrap(ids_N: np.ndarray, lengths_D: np.ndarray, before: list[int], after: list[int],
         dtype) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_N, lengths_D) with `before` and `after` around each text's ids."""
    ends_D = np.cumsum(lengths_D)
    # One np.insert pass. Insertion points in text order (each text's `before`, then its `after`)
    # never decrease, and np.insert keeps equal points in the order given: right for empty texts too.
    at_DK = np.concatenate([np.repeat((ends_D - lengths_D)[:, None], len(before), axis=1),
                            np.repeat(ends_D[:, None], len(after), axis=1)], axis=1)
    values = np.tile(np.asarray(before + after, dtype=dtype), ends_D.size)
    return np.insert(ids_N.astype(dtype, copy=False), at_DK.ravel(), values), lengths_D + len(before) + len(after)


def _flat(encoded: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths_D = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    ids_N = np.fromiter((i for ids in encoded for i in ids), dtype=np.int64, count=int(lengths_D.sum()))
    return ids_N, lengths_D


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model`. EOD is the model's `</s>` (eos_id). `word_limit`: distinct words the
    word cache keeps before it starts over."""

    kind = "sentencepiece"

    def __init__(self, path: str, word_limit: int = WORD_LIMIT) -> None:
        import sentencepiece

        self.path = path
        self._proto_bytes = _read_bytes(path)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=self._proto_bytes)
        except RuntimeError as error:  # sentencepiece: "Internal: could not parse ModelProto ..."
            raise ConfigError(f"tokenizer {path} is not a valid sentencepiece model: {error}") from None
        self.vocab_size = self._sp.get_piece_size()
        self.eod = _sp_id(self._sp.eos_id())
        if self.eod is None:
            raise ConfigError(
                f"tokenizer {path} has no end-of-document piece (eos_id=-1); retrain it with an "
                f"eos_id (python -m pipeline.data tokenizer train sets </s>=2)"
            )
        self.pad = _sp_id(self._sp.pad_id())
        self.bos = _sp_id(self._sp.bos_id())
        self.special_strings = special_strings(self._proto_bytes)
        # Exact (see pipeline.data.word_cache) and several times faster than the library alone.
        rule = word_rule(self._proto_bytes)
        self._words = None if rule is None else WordCache(
            self._encode_batch, rule, word_limit, unk=unknown_to_merge(self._proto_bytes))
        self.encoder = "sentencepiece" + ("" if rule is None else f" + word cache ({rule})")

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, num_threads=1)

    def _encode_ids(self, texts: Sequence[str],
                    literal_D: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        if self._words is None:
            return _flat(self._encode_batch(list(texts)))
        return self._words.encode(list(texts), eod=None)

    def encode_flat(self, texts: Sequence[str], dtype=np.int64, template: bool = False,
                    literal_D: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        if self._words is None:
            return super().encode_flat(texts, dtype, template)
        return self._words.encode(list(texts), eod=self.eod, dtype=dtype)  # no template

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def tokens(self) -> list[str]:
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

    def save_hf(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        hf = sentencepiece_to_hf(self._proto_bytes)
        hf.save(os.path.join(directory, "tokenizer.json"))
        _write_hf_configs(directory, self._named_specials())
        target = os.path.join(directory, "tokenizer.model")
        if not os.path.exists(target) or _read_bytes(target) != self._proto_bytes:
            with open(target, "wb") as f:
                f.write(self._proto_bytes)

    def _named_specials(self) -> dict:
        names = {"eos_token": self.eod, "bos_token": self.bos, "pad_token": self.pad}
        names["unk_token"] = _sp_id(self._sp.unk_id())
        return {k: self._sp.id_to_piece(v) for k, v in names.items() if v is not None}


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer: `tokenizer.json`, or a directory with it and tokenizer_config.json
    (whose eos_token is the EOD). Encoding runs single-threaded: preprocessing parallelises over
    processes. `gigatoken`: use it where it is exact (pipeline.data.gigatoken_encoder), rebuilt when its
    caches have grown, or after `reload_chars` characters."""

    kind = "huggingface"

    def __init__(self, path: str, gigatoken: bool = True, reload_chars: int = RELOAD_CHARS) -> None:
        # Before the first encode: each preprocessing worker is one core, so no Rust thread pool.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from tokenizers import Tokenizer as RustTokenizer

        self.path = path
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        spec = _read_bytes(file)
        try:
            self._tok = RustTokenizer.from_str(spec.decode("utf-8"))
        except Exception as error:  # tokenizers raises a bare Exception on parse errors
            raise ConfigError(f"tokenizer {file} is not a valid tokenizer.json: {error}") from None
        self._tok.encode_special_tokens = True
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self._id_to_token = self._tok.id_to_token
        specials = _hf_special_tokens(directory, vocab)
        eod = specials.get("eos_token") or next((t for t in HF_EOD_CANDIDATES if t in vocab), None)
        if eod is None:
            raise ConfigError(
                f"tokenizer {path} has no end-of-document token; set eos_token in "
                f"{os.path.join(directory, 'tokenizer_config.json')}"
            )
        self._specials = {**specials, "eos_token": eod}
        self.eod = vocab[eod]
        self.pad = vocab.get(specials.get("pad_token"))
        self.bos = vocab.get(specials.get("bos_token"))
        self.special_strings = [t.content for t in self._tok.get_added_tokens_decoder().values()
                                if t.special]
        self.prefix, self.suffix = _template(self._tok, file)
        self._fast = GigatokenEncoder.load(spec, reload_chars) if gigatoken else None
        self.encoder = "tokenizers" if self._fast is None else f"gigatoken {gigatoken_version()}"

    def _library(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def _encode_ids(self, texts: Sequence[str],
                    literal_D: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        texts = list(texts)
        if self._fast is None:
            return _flat(self._library(texts))
        literal_D = self.special_documents(texts) if literal_D is None else literal_D
        if not literal_D.any():
            return self._fast.encode(texts)
        # gigatoken would read the special-token strings as special tokens: the library does these.
        fast_ids_N, fast_lengths_D = self._fast.encode([t for t, s in zip(texts, literal_D) if not s])
        fast = iter(np.split(fast_ids_N, np.cumsum(fast_lengths_D)[:-1]) if fast_lengths_D.size else [])
        slow = iter(self._library([t for t, s in zip(texts, literal_D) if s]))
        return _flat([list(next(slow)) if s else next(fast).tolist() for s in literal_D])

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def tokens(self) -> list[str]:
        return [self._id_to_token(i) for i in range(self.vocab_size)]

    def save_hf(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, "tokenizer.json"))
        _write_hf_configs(directory, self._specials)


def _template(tok, file: str) -> tuple[list[int], list[int]]:
    """The ids the post-processor puts before and after one sequence (Llama-3: BOS before)."""
    probe = "template probe"
    plain = tok.encode(probe, add_special_tokens=False).ids
    full = tok.encode(probe, add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ConfigError(f"tokenizer {file}: its post-processor changes the text's ids, not only adds "
                      f"tokens around them; remove the post_processor from the tokenizer.json")


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer at a local `path` (see the module docstring for which file is read)."""
    if not path:
        raise ConfigError("tokenizer path is empty; give a tokenizer.json, a directory or a .model file")
    if not os.path.exists(path):
        raise ConfigError(
            f"tokenizer {path} does not exist; build the default one with `python -m "
            f"pipeline.data corpus` or train one with `python -m pipeline.data tokenizer train`"
        )
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "tokenizer.json")):
            return HFTokenizer(path)
        if os.path.exists(os.path.join(path, "tokenizer.model")):
            return SentencePieceTokenizer(os.path.join(path, "tokenizer.model"))
        raise ConfigError(f"tokenizer directory {path} has neither tokenizer.json nor tokenizer.model")
    if path.endswith(".model"):
        return SentencePieceTokenizer(path)
    if path.endswith(".json"):
        return HFTokenizer(path)
    raise ConfigError(f"tokenizer {path}: unknown file type; use a tokenizer.json, a directory or a .model")


def _read_bytes(path: str) -> bytes:
    """The bytes of tokenizer file `path`, a regular file of at most MAX_FILE_BYTES; ConfigError otherwise."""
    try:
        # Checked before opening: opening a FIFO would wait for a writer.
        found = os.stat(path)
        if not stat.S_ISREG(found.st_mode):
            raise ConfigError(f"tokenizer file {path} is not a regular file; give a tokenizer.json or .model file")
        if found.st_size > MAX_FILE_BYTES:
            raise ConfigError(f"tokenizer file {path} is larger than {MAX_FILE_BYTES} bytes; it is not a tokenizer")
        with open(path, "rb") as f:
            return f.read(found.st_size)  # bounded even if the file grows meanwhile
    except OSError as error:
        raise ConfigError(f"tokenizer file {path} cannot be read: {error.strerror or error}") from None


def _sp_id(value: int) -> Optional[int]:
    return None if value < 0 else value


def _hf_special_tokens(directory: str, vocab: dict) -> dict:
    """bos/eos/pad/unk token strings from tokenizer_config.json and special_tokens_map.json."""
    found = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = os.path.join(directory, name)
        if not os.path.exists(file):
            continue
        try:
            config = json.loads(_read_bytes(file))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"tokenizer {file} is not a valid JSON file: {error}") from None
        if not isinstance(config, dict):
            raise ConfigError(f"tokenizer {file} is not a valid JSON object")
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and value in vocab:
                found.setdefault(key, value)
    return found


def _write_hf_configs(directory: str, specials: dict) -> None:
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        **specials,
    }
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, sort_keys=True)
            f.write("\n")
