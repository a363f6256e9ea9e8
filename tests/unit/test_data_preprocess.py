"""Preprocessing: output independent of workers, resume after SIGKILL, every bad-input reason counted."""

import gzip
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from pipeline.data.corpus import documents, stdlib_files
from pipeline.data.preprocess import KILL_HOOK, BadRecordError, PreprocessOptions, preprocess
from pipeline.data.sp_bpe import train_sentencepiece_bpe
from pipeline.data.tokenizer import load_tokenizer
from pipeline.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def docs():
    return [d["text"] for d in documents(stdlib_files()[:120])]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, docs):
    out = str(tmp_path_factory.mktemp("tok"))
    train_sentencepiece_bpe(docs, out, vocab_size=800)
    return os.path.join(out, "tokenizer.model")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, docs):
    """About 1.2 MB of jsonl: several chunks and shards at the sizes the tests use."""
    path = tmp_path_factory.mktemp("in") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    return str(path)


def run(inputs, output, tokenizer, **options):
    defaults = dict(chunk_mb=0.05, shard_mb=0.3, progress=False, workers=1)
    return preprocess(
        PreprocessOptions(inputs=inputs, output=str(output), tokenizer=tokenizer, **{**defaults, **options})
    )


def output_bytes(prefix, summary):
    """Contents of every shard file, by file name."""
    directory = os.path.dirname(str(prefix))
    files = {}
    for shard in summary["shards"]:
        for ext in (".bin", ".idx"):
            with open(os.path.join(directory, shard["prefix"] + ext), "rb") as f:
                files[shard["prefix"] + ext] = f.read()
    return files


def test_tokens_are_the_tokenizer_output_plus_eod(tmp_path, corpus, tokenizer, docs):
    summary = run([corpus], tmp_path / "out", tokenizer)
    tok = load_tokenizer(tokenizer)
    stream = np.concatenate([np.fromfile(tmp_path / f"{s['prefix']}.bin", dtype=np.uint16) for s in summary["shards"]])
    expected = [i for ids in tok.encode(docs) for i in ids + [tok.eod]]
    assert stream.tolist() == expected
    assert summary["documents"] == len(docs) and summary["tokens"] == len(expected)


def test_output_is_identical_for_one_and_two_workers(tmp_path, corpus, tokenizer):
    one = run([corpus], tmp_path / "one" / "out", tokenizer, workers=1)
    two = run([corpus], tmp_path / "two" / "out", tokenizer, workers=2)
    assert len(one["shards"]) >= 3, "input too small to exercise several shards"
    assert output_bytes(tmp_path / "one" / "out", one) == output_bytes(tmp_path / "two" / "out", two)


def test_resume_after_sigkill_gives_the_uninterrupted_bytes(tmp_path, corpus, tokenizer):
    reference = run([corpus], tmp_path / "ref" / "out", tokenizer)
    prefix = tmp_path / "killed" / "out"
    command = [
        sys.executable,
        "-m",
        "pipeline.data.preprocess",
        "--input",
        corpus,
        "--output",
        str(prefix),
        "--tokenizer",
        tokenizer,
        "--chunk-mb",
        "0.05",
        "--shard-mb",
        "0.3",
        "--workers",
        "2",
        "--no-progress",
    ]
    env = {**os.environ, KILL_HOOK: "1", "PYTHONPATH": REPO}
    killed = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not os.path.exists(f"{prefix}.json"), "an interrupted run left a summary"
    assert os.path.exists(f"{prefix}_00000.bin") and not os.path.exists(f"{prefix}_00001.bin")
    resumed = run([corpus], prefix, tokenizer, workers=2)
    assert resumed["resumed_shards"] == 1
    assert output_bytes(prefix, resumed) == output_bytes(tmp_path / "ref" / "out", reference)
    assert resumed["documents"] == reference["documents"]


def test_existing_output_needs_overwrite(tmp_path, corpus, tokenizer):
    run([corpus], tmp_path / "out", tokenizer)
    with pytest.raises(ConfigError, match="--overwrite"):
        run([corpus], tmp_path / "out", tokenizer)
    assert run([corpus], tmp_path / "out", tokenizer, overwrite=True)["documents"] > 0


# (jsonl line, the reason it must be counted under); None means a good document.
DIRTY_LINES = [
    (b'{"text": "good one"}', None),
    (b'{"text": "unterminated', "malformed_json"),
    (b'["a", "list"]', "malformed_json"),
    (b'{"body": "no text field"}', "missing_field"),
    (b'{"text": null}', "missing_field"),
    (b'{"text": 42}', "not_string"),
    (b'{"text": ["a"]}', "not_string"),
    (b'{"text": "bad \xff\xfe bytes"}', "invalid_utf8"),
    (b'{"text": "lone \\ud800 surrogate"}', "invalid_utf8"),
    (b'{"text": ""}', "empty"),
    (b'{"text": "  \\n\\t "}', "empty"),
    (b"", "empty"),
    (b'{"text": "' + b"x" * 101 + b'"}', "too_long"),
    (b'{"text": "good two"}', None),
]


def write_dirty_inputs(directory):
    directory.mkdir()
    (directory / "a.jsonl").write_bytes(b"\n".join(line for line, _ in DIRTY_LINES) + b"\n")
    (directory / "b.txt").write_bytes(b"text file \xc3\x28 not utf-8")
    (directory / "c.jsonl.gz").write_bytes(b"this is not gzip data")
    (directory / "d.txt").write_text("a good text file", encoding="utf-8")


def test_dirty_input_counts_every_reason(tmp_path, tokenizer):
    write_dirty_inputs(tmp_path / "in")
    summary = run([str(tmp_path / "in")], tmp_path / "out", tokenizer, max_chars=100)
    expected = {"unreadable_file": 1}
    for _, reason in DIRTY_LINES:
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    expected["invalid_utf8"] += 1  # b.txt
    assert {k: v for k, v in summary["skipped"].items() if v} == expected
    assert summary["documents"] == 3  # two good lines and d.txt
    a = str(tmp_path / "in" / "a.jsonl")
    lines = {reason: [] for reason in expected}
    for number, (_, reason) in enumerate(DIRTY_LINES, start=1):
        if reason:
            lines[reason].append(f"{a}:{number}")
    lines["invalid_utf8"].append(f"{tmp_path / 'in' / 'b.txt'}:1")
    lines["unreadable_file"] = [f"{tmp_path / 'in' / 'c.jsonl.gz'}:1"]
    assert summary["skipped_examples"] == lines


def test_fail_fast_stops_at_the_first_bad_record(tmp_path, tokenizer):
    write_dirty_inputs(tmp_path / "in")
    with pytest.raises(BadRecordError, match=r"malformed_json at .*a\.jsonl:2"):
        run([str(tmp_path / "in")], tmp_path / "out", tokenizer, on_error="fail")
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out")], "fail-fast left output files"


@pytest.mark.parametrize("fmt", ["jsonl.gz", "jsonl.zst", "parquet", "text", "hf_dataset"])
def test_every_input_format_gives_the_jsonl_tokens(tmp_path, tokenizer, docs, fmt):
    sample = docs[:30]
    src = tmp_path / "src"
    src.mkdir()
    lines = "".join(json.dumps({"text": t}) + "\n" for t in sample).encode()
    (src / "ref.jsonl").write_bytes(lines)
    if fmt == "jsonl.gz":
        (src / "in.jsonl.gz").write_bytes(gzip.compress(lines))
    elif fmt == "jsonl.zst":
        import zstandard

        (src / "in.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": sample}), src / "in.parquet", row_group_size=7)
    elif fmt == "text":
        (src / "in").mkdir()
        for i, t in enumerate(sample):
            (src / "in" / f"{i:03d}.txt").write_text(t, encoding="utf-8")
    else:
        import datasets

        datasets.Dataset.from_dict({"text": sample}).save_to_disk(str(src / "in"))
    name = {"jsonl.gz": "in.jsonl.gz", "jsonl.zst": "in.jsonl.zst", "parquet": "in.parquet"}.get(fmt, "in")
    ref = run([str(src / "ref.jsonl")], tmp_path / "ref", tokenizer)
    got = run([str(src / name)], tmp_path / "got", tokenizer)
    assert got["documents"] == len(sample)
    assert list(output_bytes(tmp_path / "got", got).values()) == list(output_bytes(tmp_path / "ref", ref).values())
