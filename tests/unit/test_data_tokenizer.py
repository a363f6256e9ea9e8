"""Tokenizers: training is reproducible, the fast path and the Hugging Face export give the library's ids."""

import json
import os
import shutil

import pytest
import sentencepiece

from pipeline.data.corpus import documents, stdlib_files
from pipeline.data.sentencepiece_training import train_sentencepiece_bpe
from pipeline.data.tokenizer import load_tokenizer
from pipeline.errors import ConfigError
from tests.unit.data_tokenizer_kinds import colliding_words, sentencepiece_model

# Strings that stress word splitting and byte fallback: runs of spaces and tabs, other Unicode
# spaces, U+2581 (sentencepiece's space symbol), emoji, control characters, special-token lookalikes.
ODD_TEXTS = [
    "a  b\t\tc   ",
    "    def f(x):\n        return x  # two  spaces\n",
    "x\u2581 y \u2581\u2581z",
    "ideographic\u3000space, no-break\u00a0space, thin\u2009space",
    "emoji \U0001f600 and combining e\u0301 and \ufb01 ligature",
    "control \x00\x01\x1f\x7f chars",
    "</s> <s> <pad> <unk> as plain text",
    "",
    "   ",
    "\n\n\n",
    "crlf\r\nline",
]


@pytest.fixture(scope="module")
def texts():
    return [d["text"] for d in documents(stdlib_files()[:40])]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, texts):
    out = str(tmp_path_factory.mktemp("tok"))
    train_sentencepiece_bpe(texts, out, vocab_size=800)
    return out


def test_training_twice_gives_identical_files(tmp_path, texts, trained):
    train_sentencepiece_bpe(texts, str(tmp_path), vocab_size=800)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(trained, name), "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read(), f"{name} differs between two identical trainings"


def test_trained_tokenizer_has_requested_vocab_and_specials(trained):
    tok = load_tokenizer(os.path.join(trained, "tokenizer.model"))
    assert (tok.vocab_size, tok.bos, tok.eod, tok.pad) == (800, 1, 2, 3)


def test_word_cache_gives_the_library_ids(trained, texts):
    tok = load_tokenizer(os.path.join(trained, "tokenizer.model"))
    library = sentencepiece.SentencePieceProcessor(model_file=os.path.join(trained, "tokenizer.model"))
    sample = texts + ODD_TEXTS
    expected = [library.encode(t) for t in sample]
    assert tok.encode(sample) == expected
    assert tok.encode(sample) == expected, "second (cached) pass differs"


def test_constructed_words_collide_in_the_word_cache():
    """The premise of the collision tests below: both words get one hash in the word cache."""
    import numpy as np

    from pipeline.data.word_cache import WordCache

    first, second = colliding_words()
    cp_C = np.array([ord(c) for c in first + second], dtype=np.uint32)
    hashes = WordCache(lambda words: [], "space")._hashes(cp_C, np.array([0, len(first)]))
    assert first != second and hashes[0] == hashes[1]


def test_colliding_words_encode_like_the_library(trained):
    model = os.path.join(trained, "tokenizer.model")
    first, second = colliding_words()
    docs = [f"x {first}", f"y {second} {first}", second]
    expected = sentencepiece.SentencePieceProcessor(model_file=model).encode(docs)
    assert expected[0][1:] != expected[2], "the two words must tokenize differently"
    tok = load_tokenizer(model)
    assert tok.encode(docs) == expected, "one batch"
    assert [tok.encode([d])[0] for d in docs] == expected, "one text at a time (cache hits)"


def test_unknown_character_runs_merge_like_sentencepiece(tmp_path, texts):
    path = sentencepiece_model([t for t in texts if t.isascii()], str(tmp_path), byte_fallback=False)
    library = sentencepiece.SentencePieceProcessor(model_file=path)
    docs = ["Ж€漢", "abcЖ€ def", "x€€ €€y", "日本語テキスト and 中文", "ЖЖ1€€", "€(€)€"]
    expected = library.encode(docs)
    assert any(ids.count(library.unk_id()) < len(d) for ids, d in zip(expected, docs)), "no merged run"
    assert load_tokenizer(path).encode(docs) == expected


def test_encode_flat_appends_eod_per_text(trained):
    tok = load_tokenizer(os.path.join(trained, "tokenizer.model"))
    tokens, lengths = tok.encode_flat(ODD_TEXTS)
    expected = [ids + [tok.eod] for ids in tok.encode(ODD_TEXTS)]
    assert lengths.tolist() == [len(e) for e in expected]
    assert tokens.tolist() == [i for e in expected for i in e]


def test_hf_export_encodes_like_sentencepiece(tmp_path, trained, texts):
    sp = load_tokenizer(os.path.join(trained, "tokenizer.model"))
    sp.save_hf(str(tmp_path))
    hf = load_tokenizer(str(tmp_path))
    assert hf.kind == "huggingface"
    assert (hf.vocab_size, hf.eod, hf.pad, hf.bos) == (sp.vocab_size, sp.eod, sp.pad, sp.bos)
    assert hf.fingerprint == sp.fingerprint
    sample = texts + ODD_TEXTS
    assert hf.encode(sample) == sp.encode(sample)


def test_hf_save_load_round_trip(tmp_path, trained):
    first = load_tokenizer(trained)
    first.save_hf(str(tmp_path))
    second = load_tokenizer(str(tmp_path))
    assert second.fingerprint == first.fingerprint
    assert second.encode(ODD_TEXTS) == first.encode(ODD_TEXTS)


def test_transformers_loads_the_export(trained, texts):
    from transformers import AutoTokenizer

    ours = load_tokenizer(trained)
    theirs = AutoTokenizer.from_pretrained(trained)
    assert theirs.eos_token_id == ours.eod and theirs.pad_token_id == ours.pad
    sample = texts[:20]
    assert [theirs(t)["input_ids"] for t in sample] == ours.encode(sample)


def test_decode_inverts_encode(trained):
    tok = load_tokenizer(os.path.join(trained, "tokenizer.model"))
    # U+2581 decodes to a space in sentencepiece, so it is left out here.
    sample = [t for t in ODD_TEXTS if "\u2581" not in t]
    assert [tok.decode(ids) for ids in tok.encode(sample)] == sample


def test_special_token_strings_in_text_stay_text(trained):
    for path in (trained, os.path.join(trained, "tokenizer.model")):
        tok = load_tokenizer(path)
        ids = tok.encode(["</s><s><pad>"])[0]
        assert not {tok.eod, tok.bos, tok.pad} & set(ids), f"{path}: special id from plain text"


def test_missing_tokenizer_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_tokenizer(str(tmp_path / "nope"))
    assert "\n" not in str(info.value)


def test_hf_tokenizer_without_eos_is_an_error(tmp_path, trained):
    with open(os.path.join(trained, "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "</s>"]
    del spec["model"]["vocab"]["</s>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(ConfigError, match="no end-of-document token"):
        load_tokenizer(str(tmp_path))


def test_word_rule_falls_back_when_pieces_cross_word_starts():
    from pipeline.data.word_cache import finest_rule

    assert finest_rule(["\u2581foo", "\u2581\u2581", "):", "__(", "\u00e9t\u00e9"]) == "fine"
    assert finest_rule(["\u2581foo", "12"]) == "space", "digits merged: only space words are exact"
    assert finest_rule(["\u2581foo", "x("]) == "space", "letter+punctuation piece"
    assert finest_rule(["a\u2581b"]) is None, "a piece across a space: no word rule is exact"


def test_train_command_writes_a_loadable_tokenizer(tmp_path, texts, capsys):
    from pipeline.data.__main__ import main

    corpus = tmp_path / "in.jsonl"
    corpus.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts), encoding="utf-8")
    main(["tokenizer", "train", "--input", str(corpus), "--text-key", "body", "--vocab-size", "700",
          "--out", str(tmp_path / "tok")])
    printed = json.loads(capsys.readouterr().out)
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert loaded.vocab_size == printed["vocab_size"] == 700
    assert loaded.fingerprint == printed["fingerprint"]


def test_info_command_prints_ids_and_encoder(trained, capsys):
    import sentencepiece

    from pipeline.data.__main__ import main

    model = os.path.join(trained, "tokenizer.model")
    main(["tokenizer", "info", model, "--text", "def f(x):  return x"])
    printed = json.loads(capsys.readouterr().out)
    library = sentencepiece.SentencePieceProcessor(model_file=model)
    assert printed["ids"] == library.encode("def f(x):  return x")
    assert printed["encoder"].startswith("sentencepiece + word cache") and printed["template_prefix"] == []


def test_info_command_on_a_missing_path_exits_2(tmp_path, capsys):
    from pipeline.data.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(["tokenizer", "info", str(tmp_path / "nope")])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("error: tokenizer ")


def _refused(capsys, path: str) -> str:
    from pipeline.data.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(["tokenizer", "info", path])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.startswith("error: tokenizer ") and "\n" not in err, (info.value.code, err)
    return err


@pytest.mark.parametrize("name", ["tokenizer.model", "tokenizer.json"])
def test_a_corrupt_tokenizer_file_exits_2(tmp_path, capsys, trained, name):
    corrupt = tmp_path / name
    with open(os.path.join(trained, name), "rb") as f:
        corrupt.write_bytes(f.read()[:-100] + b"\xff" * 7)
    assert "not a valid" in _refused(capsys, str(corrupt))


@pytest.mark.parametrize("name", ["tokenizer.model", "tokenizer.json"])
def test_a_tokenizer_that_is_not_a_regular_file_is_not_read(tmp_path, capsys, name):
    # A link to /dev/zero would otherwise be read until memory runs out.
    (tmp_path / name).symlink_to("/dev/zero")
    assert "not a regular file" in _refused(capsys, str(tmp_path / name))


@pytest.mark.parametrize("name", ["tokenizer.model", "tokenizer.json", "tokenizer_config.json"])
def test_a_tokenizer_file_over_the_size_bound_is_not_read(tmp_path, capsys, trained, monkeypatch, name):
    from pipeline.data import tokenizer

    directory = shutil.copytree(trained, tmp_path / "tok")
    if name == "tokenizer.model":
        os.remove(directory / "tokenizer.json")  # the directory then holds a sentencepiece tokenizer
    bound = os.path.getsize(directory / "tokenizer.json") if name == "tokenizer_config.json" else 0
    if name == "tokenizer_config.json":  # valid JSON, longer than the tokenizer.json
        (directory / name).write_text((directory / name).read_text() + " " * bound)
    monkeypatch.setattr(tokenizer, "MAX_FILE_BYTES", bound or os.path.getsize(directory / name) - 1)
    err = _refused(capsys, str(directory))
    assert "larger than" in err and name in err, err
