"""Preprocessing writes exactly the library's tokens for inputs built to break a fast path: words
whose hash identity collides, runs of unknown characters without byte fallback; and Megatron-LM's
document layout for a tokenizer with a BOS template (on by default, off with --no-bos)."""

import json
import os

import pytest

from pipeline.data.preprocess import parse_args, preprocess
from pipeline.data.tokenizer import load_tokenizer
from tests.unit.data_tokenizer_kinds import byte_level_bpe, corpus_texts, sentencepiece_model

# The word identity before this fix: two polynomial hashes mod 2^64 of (code point + 1), and the length.
OLD_PRIMES = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F)


def old_identity(word: str) -> tuple:
    hashes = tuple(sum((ord(c) + 1) * pow(p, j, 1 << 64) for j, c in enumerate(word)) % (1 << 64)
                   for p in OLD_PRIMES)
    return hashes + (len(word),)


def colliding_words() -> tuple[str, str]:
    """The Thue-Morse word of length 2^11 over {a, b} and its complement: their difference
    prod_i (1 - p^(2^i)) is divisible by 2^66 for every odd p, so every such hash mod 2^64 agrees."""
    first = "".join("ab"[bin(i).count("1") % 2] for i in range(1 << 11))
    return first, first.translate(str.maketrans("ab", "ba"))


@pytest.fixture(scope="module")
def texts():
    return corpus_texts()


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory, texts):
    return sentencepiece_model(texts, str(tmp_path_factory.mktemp("sp")))


def read_stream(summary: dict, prefix) -> list[list[int]]:
    """The documents written (each ending with its EOD), read with megatron-core."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    directory = os.path.dirname(str(prefix))
    docs = []
    for shard in summary["shards"]:
        dataset = IndexedDataset(os.path.join(directory, shard["prefix"]))
        docs += [dataset[i].tolist() for i in range(len(dataset))]
    return docs


def write_jsonl(path, docs: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return str(path)


def test_constructed_words_collide_under_the_old_identity():
    first, second = colliding_words()
    assert first != second and old_identity(first) == old_identity(second)


def test_colliding_words_encode_like_the_library(sp_model):
    import sentencepiece

    first, second = colliding_words()
    docs = [f"x {first}", f"y {second} {first}", second]
    expected = sentencepiece.SentencePieceProcessor(model_file=sp_model).encode(docs)
    assert expected[0][1:] != expected[2], "the two words must tokenize differently"
    tok = load_tokenizer(sp_model)
    assert tok.encode(docs) == expected, "one batch"
    assert [tok.encode([d])[0] for d in docs] == expected, "one text at a time (cache hits)"


@pytest.mark.parametrize("workers", [1, 2])
def test_colliding_words_preprocess_like_the_library(tmp_path, sp_model, texts, workers):
    import sentencepiece

    first, second = colliding_words()
    # Small chunks: the words meet in one worker's cache, or in different workers at 2.
    docs = [f"{first} {texts[0][:3000]}", f"{second} {first}", f"{texts[1][:3000]} {second}", second]
    prefix = tmp_path / "out"
    summary = preprocess(parse_args(["--input", write_jsonl(tmp_path / "in.jsonl", docs), "--output",
                                     str(prefix), "--tokenizer", sp_model, "--workers", str(workers),
                                     "--chunk-mb", "0.004", "--no-progress"]))
    library = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    assert read_stream(summary, prefix) == [ids + [library.eos_id()] for ids in library.encode(docs)]


def test_unknown_character_runs_merge_like_sentencepiece(tmp_path, texts):
    import sentencepiece

    path = sentencepiece_model([t for t in texts if t.isascii()], str(tmp_path), byte_fallback=False)
    library = sentencepiece.SentencePieceProcessor(model_file=path)
    docs = ["Ж€漢", "abcЖ€ def", "x€€ €€y", "日本語テキスト and 中文", "ЖЖ1€€", "€(€)€"]
    expected = library.encode(docs)
    assert any(ids.count(library.unk_id()) < len(d) for ids, d in zip(expected, docs)), "no merged run"
    assert load_tokenizer(path).encode(docs) == expected


@pytest.fixture(scope="module")
def llama3(tmp_path_factory, texts):
    return byte_level_bpe(texts, str(tmp_path_factory.mktemp("llama3")), llama3=True)


BOS_DOCS = ["Hello world.", "  indented\n\tcode()", "digits 12345 and émoji 👍🏽", "<|begin_of_text|> inside"]


@pytest.mark.parametrize("flag", [[], ["--no-bos"]], ids=["default", "no_bos"])
def test_bos_template_is_megatrons_by_default_and_off_with_flag(tmp_path, llama3, flag):
    from transformers import AutoTokenizer

    prefix = tmp_path / "out"
    summary = preprocess(parse_args(["--input", write_jsonl(tmp_path / "in.jsonl", BOS_DOCS), "--output",
                                     str(prefix), "--tokenizer", llama3, "--workers", "1", "--no-progress",
                                     *flag]))
    hf = AutoTokenizer.from_pretrained(llama3)
    bos, eod = hf.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>"])
    # Megatron-LM's tools/preprocess_data.py writes tokenizer(text).input_ids + [eod]; it would read
    # the special-token string of the last document as the token, which the pipeline keeps as text.
    megatron = [hf(d).input_ids + [eod] for d in BOS_DOCS[:-1]]
    written = read_stream(summary, prefix)
    if flag:
        assert written[:-1] == [ids[1:] for ids in megatron], "--no-bos still writes the template"
        assert (summary["bos"], summary["document_prefix"]) == (False, [])
    else:
        assert written[:-1] == megatron
        assert (summary["bos"], summary["document_prefix"]) == (True, [bos])
    assert written[-1][1 if not flag else 0 :].count(bos) == 0, "special-token string became a token"
    assert summary["documents_with_special_token_strings"] == 1
