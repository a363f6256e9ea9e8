"""The embedded default corpus: reproducible, idempotent, and the full build fits the time budget."""

import os
import time

from pipeline.data import corpus
from pipeline.data.blend import build_datasets
from pipeline.data.config import DataConfig
from pipeline.data.tokenizer import load_tokenizer

BUILT_FILES = [
    "corpus/stdlib.jsonl",
    "tokenizer/tokenizer.model",
    "tokenizer/tokenizer.json",
    "corpus_text_document_00000.bin",
    "corpus_text_document_00000.idx",
]


def read(directory, name):
    with open(os.path.join(directory, name), "rb") as f:
        return f.read()


def test_split_module_keeps_the_text_and_cuts_at_definitions():
    source = "import os\n\n\n" + "".join(
        f"@decorator\ndef f{i}(x):\n    return x + {i}\n\n\nclass C{i}:\n    def m(self):\n        pass\n\n"
        for i in range(40)
    )
    pieces = corpus.split_module(source, min_chars=100)
    assert "".join(pieces) == source
    assert len(pieces) > 5 and all(len(p) >= 100 for p in pieces)
    assert all(p.lstrip().startswith(("@", "def ", "class ")) for p in pieces[1:]), "cut inside a statement"


def test_small_slice_builds_byte_identically_twice(tmp_path):
    first = corpus.build(str(tmp_path / "a"), max_files=25, vocab_size=600, workers=1, progress=False)
    second = corpus.build(str(tmp_path / "b"), max_files=25, vocab_size=600, workers=2, progress=False)
    assert first["documents"] > 25
    assert first["corpus_sha256"] == second["corpus_sha256"]
    for name in BUILT_FILES:
        assert read(tmp_path / "a", name) == read(tmp_path / "b", name), f"{name} differs"


def test_second_build_is_a_quick_no_op(tmp_path):
    out = str(tmp_path / "c")
    corpus.build(out, max_files=5, vocab_size=400, workers=1, progress=False)
    stamp = os.path.getmtime(os.path.join(out, "corpus_text_document_00000.bin"))
    start = time.perf_counter()
    corpus.build(out, max_files=5, vocab_size=400, workers=1, progress=False)
    assert time.perf_counter() - start < 1.0
    assert os.path.getmtime(os.path.join(out, "corpus_text_document_00000.bin")) == stamp


def test_default_corpus_builds_in_budget_and_feeds_training(tmp_path):
    start = time.perf_counter()
    record = corpus.build(str(tmp_path), progress=False)
    elapsed = time.perf_counter() - start
    assert elapsed < 120, f"default corpus took {elapsed:.0f} s (budget 120 s on 2 cores)"
    tokenizer = load_tokenizer(str(tmp_path / "tokenizer"))
    assert tokenizer.vocab_size == corpus.VOCAB_SIZE == 4096
    defaults = DataConfig()
    relocated = DataConfig(
        tokenizer=str(tmp_path / os.path.relpath(defaults.tokenizer, "data/build")),
        paths=[str(tmp_path / os.path.relpath(p, "data/build")) for p in defaults.paths],
        weights=defaults.weights,
        split=defaults.split,
    )
    train, valid, _ = build_datasets(relocated, 256, 1234, (1600, 80, 0), run_dir=str(tmp_path), model_vocab_size=4096)
    assert len(train) >= 1600 and len(valid) >= 80
    assert record["tokens"] > 2_000_000
