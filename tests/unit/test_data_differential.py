"""Randomised differential test: for every tokenizer kind the pipeline accepts, what preprocessing
writes equals the tokenizer library's own encoding, on thousands of seeded adversarial strings
(mixed scripts, emoji sequences, whitespace runs, digits, U+2581, control characters, special-token
strings), with the word cache and gigatoken forced to start over mid-run."""

import os

import numpy as np
import pytest

from pipeline.data.gigatoken_encoder import gigatoken_version
from pipeline.data.tokenizer import HFTokenizer, SentencePieceTokenizer
from tests.unit.data_tokenizer_kinds import byte_level_bpe, corpus_texts, sentencepiece_model

SEED = 20261129
STRINGS = 4000
BATCH = 400
PIECES = [
    "the", "quick", "Brown", "fox", "def", "return", "x_1", "print(", "):", "==", "->", "#",
    "привет", "мир", "日本語", "テキスト", "中文字符", "مرحبا", "नमस्ते", "ελληνικά", "한국어", "café", "e\u0301",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466", "\U0001f44d\U0001f3fd", "\U0001f1fa\U0001f1f8",
    "\u2764\ufe0f", "\U0001f600",
    " ", "  ", "    ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\u3000", "\u00a0", "\u2009", " \n ",
    "0", "7", "42", "2026", "3.14159", "1e-9", "٣", "½",
    "\u2581", "\u2581\u2581", " \u2581", "\u2581x",
    "\x00", "\x01", "\x1b[0m", "\x7f", "\x0b", "\u200b", "\ufeff",
    "<s>", "</s>", "<unk>", "<pad>", "<|endoftext|>", "<|begin_of_text|>", "<|end_of_text|>",
]


def random_strings(count: int, seed: int) -> list[str]:
    """`count` strings of 0-40 pieces (and random code points), deterministic for `seed`."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        parts = []
        for _ in range(rng.integers(0, 40)):
            if rng.random() < 0.1:  # any code point but surrogates
                cp = int(rng.integers(1, 0x30000))
                parts.append(chr(cp if not 0xD800 <= cp < 0xE000 else 0x41))
            else:
                parts.append(PIECES[rng.integers(len(PIECES))])
        out.append("".join(parts))
    return out


@pytest.fixture(scope="module")
def strings():
    return random_strings(STRINGS, SEED)


@pytest.fixture(scope="module")
def texts():
    return corpus_texts()


def written(tokenizer, strings: list[str], template: bool) -> list[list[int]]:
    """What preprocessing writes per document (encode_flat), batch by batch."""
    docs = []
    for first in range(0, len(strings), BATCH):
        tokens, lengths = tokenizer.encode_flat(strings[first : first + BATCH], template=template)
        docs += [d.tolist() for d in np.split(tokens, np.cumsum(lengths)[:-1])]
    return docs


def first_difference(ours, expected, strings) -> str:
    for i, (a, b) in enumerate(zip(ours, expected)):
        if a != b:
            return f"string {i} {strings[i]!r}: ours {a[:20]}..., library {b[:20]}..."
    return "lengths differ"


@pytest.mark.parametrize("byte_fallback", [True, False], ids=["byte_fallback", "no_byte_fallback"])
def test_sentencepiece_matches_library(tmp_path, texts, strings, byte_fallback):
    import sentencepiece

    path = sentencepiece_model(texts, str(tmp_path), byte_fallback=byte_fallback)
    ours = SentencePieceTokenizer(path, word_limit=2000)  # starts over several times
    library = sentencepiece.SentencePieceProcessor(model_file=path)
    expected = [ids + [ours.eod] for ids in library.encode(strings)]
    got = written(ours, strings, template=True)
    assert got == expected, first_difference(got, expected, strings)
    assert ours.encoder.startswith("sentencepiece + word cache"), "the fast path was not tested"


@pytest.mark.parametrize("kind", ["gpt2", "llama3", "sentencepiece_export"])
@pytest.mark.parametrize("gigatoken", [True, False], ids=["gigatoken", "tokenizers"])
def test_huggingface_matches_library(tmp_path, texts, strings, kind, gigatoken):
    from tokenizers import Tokenizer

    if kind == "sentencepiece_export":
        directory = os.path.dirname(sentencepiece_model(texts, str(tmp_path)))
    else:
        directory = byte_level_bpe(texts, str(tmp_path), llama3=kind == "llama3")
    ours = HFTokenizer(directory, gigatoken=gigatoken, reload_chars=50_000)  # rebuilt mid-run
    library = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    library.encode_special_tokens = True  # special-token strings in text stay text
    encodings = library.encode_batch(strings, add_special_tokens=True)
    expected = [e.ids + [ours.eod] for e in encodings]
    got = written(ours, strings, template=True)
    assert got == expected, first_difference(got, expected, strings)
    uses_gigatoken = kind != "sentencepiece_export" and gigatoken and gigatoken_version() is not None
    assert ours.encoder.startswith("gigatoken") == uses_gigatoken, ours.encoder


def test_gigatoken_is_rebuilt_when_the_process_grows(tmp_path, texts, strings, monkeypatch):
    """The memory bound: past `cache_bytes` of growth since the last build (here any growth at all, the
    resident size faked to grow by a page per call) the encoder is rebuilt, and the ids stay exact."""
    from pipeline.data import gigatoken_encoder

    pages = iter(range(1, 10**6))
    monkeypatch.setattr(gigatoken_encoder, "resident_bytes", lambda: next(pages) * 4096)
    directory = byte_level_bpe(texts, str(tmp_path), llama3=False)
    spec = open(os.path.join(directory, "tokenizer.json"), "rb").read()
    encoder = gigatoken_encoder.GigatokenEncoder(spec, cache_bytes=0)
    builds = []
    monkeypatch.setattr(encoder, "_build", lambda original=encoder._build: builds.append(1) or original())
    reference = gigatoken_encoder.GigatokenEncoder(spec, cache_bytes=1 << 40)
    for start in range(0, 40, 10):
        got, want = encoder.encode(strings[start:start + 10]), reference.encode(strings[start:start + 10])
        assert got[0].tolist() == want[0].tolist() and got[1].tolist() == want[1].tolist()
    assert len(builds) == 4, "rebuilt before every batch once the process grew"
