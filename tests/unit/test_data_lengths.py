"""The document-length report: preprocessing's summary and `python -m pipeline.data lengths` agree with
lengths counted from the tokenizer itself, per dataset and per phase of a run."""

import json
import math

import pytest

from pipeline.data.__main__ import main
from pipeline.data.corpus import documents, stdlib_files
from pipeline.data.preprocess import PreprocessOptions, preprocess
from pipeline.data.sentencepiece_training import train_sentencepiece_bpe
from pipeline.data.tokenizer import load_tokenizer

# Lengths spread over orders of magnitude, so that shares above 16 and 256 tokens are neither 0 nor 1.
SOURCE = "".join(d["text"] for d in documents(stdlib_files()[:10]))
TEXTS = [SOURCE[(977 * i) % 20000:][:n] for i, n in enumerate((4, 15, 40, 90, 200, 450, 900, 2000, 4500) * 4)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("lengths")
    train_sentencepiece_bpe(TEXTS, str(out / "tok"), vocab_size=700)
    source = out / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    summary = preprocess(PreprocessOptions(inputs=[str(source)], output=str(out / "docs"), tokenizer=str(out / "tok"),
                                           workers=1, progress=False, chunk_mb=0.01, shard_mb=0.02))
    return out, summary


def expected(out, thresholds):
    """The report from the tokenizer's own ids (+ EOD), with nearest-rank percentiles."""
    tokenizer = load_tokenizer(str(out / "tok"))
    lengths = sorted(len(ids) + 1 for ids in tokenizer.encode(TEXTS))
    total = sum(lengths)

    def rank(p):
        return lengths[math.ceil(p * len(lengths)) - 1]

    return {"documents": len(lengths), "tokens": total, "p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99),
            "max": lengths[-1], "shares": {str(t): sum(n for n in lengths if n >= t) / total for t in thresholds}}


def test_preprocessing_writes_the_length_distribution_into_its_summary(built):
    out, summary = built
    assert len(summary["shards"]) > 1, "the report must cover every shard"
    got = summary["document_lengths"]
    want = expected(out, (4096, 16384, 65536))
    assert {k: got[k] for k in ("documents", "tokens", "p50", "p90", "p99", "max")} == {
        k: want[k] for k in ("documents", "tokens", "p50", "p90", "p99", "max")}
    assert got["mean"] == round(want["tokens"] / want["documents"], 1)
    on_disk = json.loads((out / "docs.json").read_text())["document_lengths"]
    assert on_disk == got


def test_lengths_command_reports_datasets_and_the_phases_of_a_run(built, capsys):
    out, _ = built
    prefix = str(out / "docs")
    main(["lengths", prefix])
    line = capsys.readouterr().out.strip()
    want = expected(out, (16, 256))
    assert line.startswith(f"{prefix}: {want['documents']:,} documents, {want['tokens']:,} tokens"), line

    main(["lengths", "--config", f"data.paths=[{prefix}]", f"data.tokenizer={out / 'tok'}", "train.iters=10",
          "data.phases=[{name: short, start_step: 0, seq_length: 16}, {name: long, start_step: 5, seq_length: 256}]"])
    printed = capsys.readouterr().out
    assert "phase short (steps 0-4, seq_length 16):" in printed and "phase long (steps 5-9, seq_length 256):" in printed
    for length in (16, 256):
        assert f">= {length:,}: {want['shares'][str(length)]:.1%}" in printed, printed
    assert 0 < want["shares"]["256"] < want["shares"]["16"] < 1
