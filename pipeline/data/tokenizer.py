"""Tokenizers from local files: Hugging Face `tokenizer.json` (or a directory) and sentencepiece `.model`.

One small interface for the rest of the pipeline (`vocab_size`, `eod`, `pad`, `bos`, `encode`, `decode`,
`save_hf`, `fingerprint`); nothing is ever downloaded. Train a sentencepiece BPE tokenizer (saved as
`tokenizer.model` plus the equivalent Hugging Face files in the same directory):

    python -m pipeline.data.tokenizer train --input corpus.jsonl --vocab-size 4096 --out data/build/tokenizer

`--input` takes what `pipeline.data.preprocess` reads (jsonl[.gz|.zst], parquet, text files, directories,
globs; `--text-key` names the JSON/parquet field). Training is deterministic: same input and flags give
byte-identical files. Check a tokenizer: `python -m pipeline.data.tokenizer info PATH`.

Which file is loaded: a path ending in `.model` is sentencepiece; a `tokenizer.json` file or a directory
holding one is Hugging Face (a directory with only `tokenizer.model` is sentencepiece). Document text is
encoded literally: a special-token string such as "</s>" inside a document is not turned into the special
token (only the EOD appended by preprocessing is), so data cannot inject control tokens.

Shapes: N tokens, D texts.
"""

import argparse
import hashlib
import json
import os
import sys
from functools import cached_property
from itertools import chain
from typing import Iterable, Optional, Sequence

import numpy as np

from pipeline.data.sp_bpe import sentencepiece_to_hf, word_rule
from pipeline.data.wordcache import WordCache
from pipeline.errors import ConfigError

HF_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")


class Tokenizer:
    """The interface every tokenizer implements. Ids of special tokens are None when absent (not eod)."""

    kind: str
    path: str
    vocab_size: int
    eod: int
    pad: Optional[int]
    bos: Optional[int]

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without BOS/EOD."""
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

    def encode_flat(self, texts: Sequence[str], dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
        """(tokens_N, lengths_D): all texts' ids concatenated, each followed by EOD, and the length
        (EOD included) of each."""
        encoded = self.encode(texts)
        lengths_D = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
        eod = [self.eod]
        tokens_N = np.fromiter(chain.from_iterable(ids + eod for ids in encoded), dtype=dtype,
                               count=int(lengths_D.sum()))
        return tokens_N, lengths_D

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
            "fingerprint": self.fingerprint,
        }


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model`. EOD is the model's `</s>` (eos_id)."""

    kind = "sentencepiece"

    def __init__(self, path: str) -> None:
        import sentencepiece

        self.path = path
        self._proto_bytes = _read_bytes(path)
        self._sp = sentencepiece.SentencePieceProcessor(model_proto=self._proto_bytes)
        self.vocab_size = self._sp.get_piece_size()
        self.eod = _sp_id(self._sp.eos_id())
        if self.eod is None:
            raise ConfigError(
                f"tokenizer {path} has no end-of-document piece (eos_id=-1); retrain it with an "
                f"eos_id (python -m pipeline.data.tokenizer train sets </s>=2)"
            )
        self.pad = _sp_id(self._sp.pad_id())
        self.bos = _sp_id(self._sp.bos_id())
        # Exact (see pipeline.data.wordcache) and several times faster than the library alone.
        rule = word_rule(self._proto_bytes)
        self._words = None if rule is None else WordCache(self._encode_batch, rule)

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, num_threads=1)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        if self._words is None:
            return self._encode_batch(list(texts))
        tokens_N, lengths_D = self._words.encode(list(texts), eod=None)
        return [ids.tolist() for ids in np.split(tokens_N, np.cumsum(lengths_D)[:-1])] if texts else []

    def encode_flat(self, texts: Sequence[str], dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
        if self._words is None:
            return super().encode_flat(texts, dtype)
        return self._words.encode(list(texts), eod=self.eod, dtype=dtype)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def tokens(self) -> list[str]:
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

    def save_hf(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        hf = sentencepiece_to_hf(self._proto_bytes)
        hf.save(os.path.join(directory, "tokenizer.json"))
        _write_hf_configs(directory, self._special_strings())
        target = os.path.join(directory, "tokenizer.model")
        if not os.path.exists(target) or _read_bytes(target) != self._proto_bytes:
            with open(target, "wb") as f:
                f.write(self._proto_bytes)

    def _special_strings(self) -> dict:
        names = {"eos_token": self.eod, "bos_token": self.bos, "pad_token": self.pad}
        names["unk_token"] = _sp_id(self._sp.unk_id())
        return {k: self._sp.id_to_piece(v) for k, v in names.items() if v is not None}


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer: `tokenizer.json`, or a directory with it and tokenizer_config.json
    (whose eos_token is the EOD). Encoding runs single-threaded: preprocessing parallelises over processes."""

    kind = "huggingface"

    def __init__(self, path: str) -> None:
        # Before the first encode: each preprocessing worker is one core, so no Rust thread pool.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from tokenizers import Tokenizer as RustTokenizer

        self.path = path
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        try:
            self._tok = RustTokenizer.from_file(file)
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

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def tokens(self) -> list[str]:
        return [self._id_to_token(i) for i in range(self.vocab_size)]

    def save_hf(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, "tokenizer.json"))
        _write_hf_configs(directory, self._specials)


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer at a local `path` (see the module docstring for which file is read)."""
    if not path:
        raise ConfigError("tokenizer path is empty; give a tokenizer.json, a directory or a .model file")
    if not os.path.exists(path):
        raise ConfigError(
            f"tokenizer {path} does not exist; build the default one with `python -m "
            f"pipeline.data.corpus` or train one with `python -m pipeline.data.tokenizer train`"
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
    with open(path, "rb") as f:
        return f.read()


def _sp_id(value: int) -> Optional[int]:
    return None if value < 0 else value


def _hf_special_tokens(directory: str, vocab: dict) -> dict:
    """bos/eos/pad/unk token strings from tokenizer_config.json and special_tokens_map.json."""
    found = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = os.path.join(directory, name)
        if not os.path.exists(file):
            continue
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
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


def _train(args: argparse.Namespace) -> None:
    from pipeline.data.sources import iter_texts
    from pipeline.data.sp_bpe import train_sentencepiece_bpe

    tokenizer = train_sentencepiece_bpe(
        iter_texts(args.input, text_key=args.text_key),
        args.out,
        vocab_size=args.vocab_size,
        seed=args.seed,
        max_sentences=args.max_sentences,
    )
    print(json.dumps(tokenizer.describe()))


def _info(args: argparse.Namespace) -> None:
    tokenizer = load_tokenizer(args.path)
    info = tokenizer.describe()
    info.update(pad=tokenizer.pad, bos=tokenizer.bos)
    if args.text is not None:
        info["ids"] = tokenizer.encode([args.text])[0]
    print(json.dumps(info, indent=2))


def main(argv: Optional[list[str]] = None) -> None:
    """Command line: `train` a sentencepiece BPE tokenizer, or print `info` about one."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.data.tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a sentencepiece BPE tokenizer")
    train.add_argument("--input", nargs="+", required=True, help="files, directories or globs")
    train.add_argument("--text-key", default="text", help="JSON/parquet field holding the text")
    train.add_argument("--vocab-size", type=int, required=True, help="total ids, specials included")
    train.add_argument("--out", required=True, help="output directory")
    train.add_argument("--seed", type=int, default=1234, help="sentencepiece's random seed")
    train.add_argument("--max-sentences", type=int, default=0,
                       help="train on at most this many lines, sampled with --seed (0: all)")
    train.set_defaults(run=_train)
    info = commands.add_parser("info", help="print vocab size, special ids and fingerprint")
    info.add_argument("path")
    info.add_argument("--text", help="also print the ids of this text")
    info.set_defaults(run=_info)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ConfigError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
