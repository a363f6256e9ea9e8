"""Preprocessing: output independent of workers, resume after SIGKILL, every bad-input reason counted,
faults (failed overwrite, no documents, unwritable output, damaged input) end in one-line errors; the
library's tokens for words that collide in the word cache, and Megatron-LM's layout for a BOS template."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from pipeline.data.__main__ import preprocess_options
from pipeline.data.corpus import documents, stdlib_files
from pipeline.data.preprocess import BadRecordError, PreprocessOptions, preprocess
from pipeline.data.sentencepiece_training import train_sentencepiece_bpe
from pipeline.data.tokenizer import load_tokenizer
from pipeline.errors import DataError, StorageError
from tests.fault_injection import fault_env
from tests.unit.data_tokenizer_kinds import byte_level_bpe, colliding_words

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


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, tokenizer):
    """(prefix, summary) of the corpus preprocessed with the tests' default options, one worker."""
    prefix = tmp_path_factory.mktemp("ref") / "out"
    return prefix, run([corpus], prefix, tokenizer)


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


def test_tokens_are_the_tokenizer_output_plus_eod(reference, tokenizer, docs):
    prefix, summary = reference
    tok = load_tokenizer(tokenizer)
    stream = np.concatenate([np.fromfile(prefix.parent / f"{s['prefix']}.bin", dtype=np.uint16)
                             for s in summary["shards"]])
    expected = [i for ids in tok.encode(docs) for i in ids + [tok.eod]]
    assert stream.tolist() == expected
    assert summary["documents"] == len(docs) and summary["tokens"] == len(expected)


def test_shards_are_what_megatron_cores_builder_writes(reference, tokenizer, docs, tmp_path):
    """Our own .idx writer (no torch import, no per-document loop) against IndexedDatasetBuilder,
    byte for byte, for every shard; and our dtype rule and codes against megatron-core's."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from pipeline.data.shards import DTYPE_CODES, token_dtype

    prefix, summary = reference
    ours = output_bytes(prefix, summary)
    tok = load_tokenizer(tokenizer)
    encoded = iter(tok.encode(docs))
    for shard in summary["shards"]:
        base = str(tmp_path / shard["prefix"])
        builder = IndexedDatasetBuilder(base + ".bin", dtype=np.uint16)
        for _ in range(shard["documents"]):
            ids = np.array(next(encoded) + [tok.eod], dtype=np.uint16)
            builder.add_document(ids, [ids.size])
        builder.finalize(base + ".idx")
        for ext in (".bin", ".idx"):
            with open(base + ext, "rb") as f:
                assert f.read() == ours[shard["prefix"] + ext], f"{shard['prefix']}{ext} differs from megatron-core's"
    assert DTYPE_CODES == {d.name: d.value for d in DType}
    for vocab in (4096, 65499, 65500, 131072):
        assert token_dtype(vocab) == DType.optimal_dtype(vocab)


def test_output_is_identical_for_one_and_two_workers(tmp_path, corpus, tokenizer, reference):
    one_prefix, one = reference
    two = run([corpus], tmp_path / "two" / "out", tokenizer, workers=2)
    assert len(one["shards"]) >= 3, "input too small to exercise several shards"
    assert output_bytes(one_prefix, one) == output_bytes(tmp_path / "two" / "out", two)


def processes_with_marker(marker):
    """Live processes whose environment holds `marker` (the run and everything it started)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
        except OSError:  # gone meanwhile
            continue
        if state != b"Z" and marker in environ:
            found.append(int(pid))
    return found


def all_files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
def test_sigkill_kills_workers_and_the_rerun_resumes_identically(tmp_path, corpus, tokenizer, docs, reference,
                                                                 overwrite):
    """kill -9 of the run: its workers die with it, an --overwrite run leaves the old dataset whole,
    and the same command again resumes at the first unfinished shard with the uninterrupted bytes."""
    prefix = tmp_path / "killed" / "out"
    if overwrite:
        old_input = tmp_path / "old.jsonl"
        old_input.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:5]), encoding="utf-8")
        run([str(old_input)], prefix, tokenizer)
        old = all_files(prefix.parent)
    command = [
        sys.executable,
        "-m",
        "pipeline.data",
        "preprocess",
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
    ] + ["--overwrite"] * overwrite
    marker = f"PREPROCESS_TEST_RUN={uuid.uuid4().hex}"
    key, value = marker.split("=")
    env = {**os.environ, **fault_env("preprocess-killed-after-shards@1"), key: value}
    # Output to a file, not a pipe: workers that outlive the run would hold a pipe open.
    with open(tmp_path / "stderr", "wb") as log:
        killed = subprocess.run(command, env=env, cwd=REPO, stdout=log, stderr=log, timeout=120)
    assert killed.returncode == -signal.SIGKILL, (tmp_path / "stderr").read_text()[-2000:]
    deadline = time.monotonic() + 5
    while processes_with_marker(marker.encode()) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = processes_with_marker(marker.encode())
    for pid in alive:  # not to leave them behind when failing
        os.kill(pid, signal.SIGKILL)
    assert not alive, "processes of the killed run were still alive 5 s after it"
    built = prefix.parent / ".out.overwrite" if overwrite else prefix.parent
    if overwrite:
        assert all_files(prefix.parent) == old, "the killed --overwrite run changed the old dataset"
    else:
        assert not os.path.exists(f"{prefix}.json"), "an interrupted run left a summary"
    assert (built / "out_00000.bin").exists() and not (built / "out_00001.bin").exists()
    resumed = run([corpus], prefix, tokenizer, workers=2, overwrite=overwrite)
    assert resumed["resumed_shards"] == 1
    reference_prefix, uninterrupted = reference
    assert output_bytes(prefix, resumed) == output_bytes(reference_prefix, uninterrupted)
    assert resumed["documents"] == uninterrupted["documents"]


def test_existing_output_needs_overwrite(tmp_path, corpus, tokenizer):
    run([corpus], tmp_path / "out", tokenizer)
    with pytest.raises(DataError, match="--overwrite"):
        run([corpus], tmp_path / "out", tokenizer)
    assert run([corpus], tmp_path / "out", tokenizer, overwrite=True)["documents"] > 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [], "build leftovers"


def write_jsonl(path, texts, key="text"):
    path.write_text("".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("failure", ["no documents", "bad record with --on-error fail"])
def test_failed_overwrite_keeps_the_old_dataset(tmp_path, tokenizer, docs, failure):
    good = write_jsonl(tmp_path / "good.jsonl", docs[:20])
    (tmp_path / "out").mkdir()
    prefix = tmp_path / "out" / "data"
    before = run([good], prefix, tokenizer)
    files = all_files(tmp_path / "out")
    if failure == "no documents":
        bad, options = write_jsonl(tmp_path / "bad.jsonl", docs[:20], key="body"), {}
    else:
        bad, options = str(tmp_path / "bad.jsonl"), {"on_error": "fail"}
        (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(DataError):
        run([bad], prefix, tokenizer, overwrite=True, **options)
    assert all_files(tmp_path / "out") == files, "the failed --overwrite run changed the old dataset"
    assert json.loads((tmp_path / "out" / "data.json").read_text())["documents"] == before["documents"]


def test_zero_documents_fail_and_leave_nothing_complete(tmp_path, tokenizer, docs):
    wrong = write_jsonl(tmp_path / "wrong.jsonl", docs[:5], key="body")
    with pytest.raises(DataError, match="no documents") as info:
        run([wrong], tmp_path / "out", tokenizer)
    assert "\n" not in str(info.value)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out")], "a run without documents left files"
    fixed = run([wrong], tmp_path / "out", tokenizer, text_key="body")
    assert fixed["documents"] == 5, "the corrected rerun was refused or lost documents"


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_wrong_text_key_names_the_columns_present(tmp_path, tokenizer, docs, fmt):
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "in.jsonl", docs[:5], key="body")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = str(tmp_path / "in.parquet")
        pq.write_table(pa.table({"body": docs[:5], "id": list(range(5))}), path)
    with pytest.raises(DataError, match=r"no (field|column) 'text'; \w+ present: body, id; .*--text-key"):
        run([path], tmp_path / "out", tokenizer)


@pytest.mark.parametrize("where", ["below a file", "read-only file system"])
def test_unwritable_output_fails_before_any_work(tmp_path, corpus, tokenizer, where):
    if where == "below a file":
        (tmp_path / "file").write_text("x")
        output, named = tmp_path / "file" / "sub" / "out", str(tmp_path / "file")
    else:
        output, named = "/sys/preprocess-test/out", "/sys/preprocess-test"
    with pytest.raises(StorageError, match="preprocessed dataset") as info:
        run([corpus], output, tokenizer)
    assert named in str(info.value) and "\n" not in str(info.value)


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


# Valid UTF-8 lines that look like records (the fast path of record_parsing._parse_jsonl) but are not
# all good: each must come out as json.loads and the checks would have it (text, or skip reason).
RECORD_LIKE_LINES = [
    ('{"text": "plain"}', "plain"),
    ('{"text": "crlf"}\r', "crlf"),
    ('{"text": "spaces after"} \t ', "spaces after"),
    ('{"text": "first", "text": "last"}', "last"),
    ('{"text": "caf\\u00e9 \u00e9t\u00e9"}', "caf\u00e9 \u00e9t\u00e9"),
    ('{"text": "extra"} {"text": "data"}', "malformed_json"),
    ('{"text": "cut', "malformed_json"),
    ('{"text": "lone \\udfff"}', "invalid_utf8"),
    ('{"text": " \\u00a0\\u2003 "}', "empty"),
    ('{"text": ""}', "empty"),
    ('{"text": 7}', "not_string"),
    ('{"other": "x"}', "missing_field"),
    ('{"text": "' + "y" * 101 + '"}', "too_long"),
    ('{' * 100000 + '}' * 100000, "malformed_json"),
]


def test_record_like_lines_parse_as_json_loads_would():
    from pipeline.data.record_parsing import parse_chunk
    from pipeline.data.sources import Chunk

    data = "".join(line + "\n" for line, _ in RECORD_LIKE_LINES).encode("utf-8")
    parsed = parse_chunk(Chunk("jsonl", "r.jsonl", 1, data, len(data)), "text", max_chars=100)
    reasons = {"malformed_json", "invalid_utf8", "empty", "not_string", "missing_field", "too_long"}
    assert parsed.texts == [want for _, want in RECORD_LIKE_LINES if want not in reasons]
    expected = {}
    for number, (_, want) in enumerate(RECORD_LIKE_LINES, start=1):
        if want in reasons:
            expected.setdefault(want, []).append(f"r.jsonl:{number}")
    assert parsed.examples == expected and sum(parsed.skipped.values()) == sum(map(len, expected.values()))


def write_dirty_inputs(directory):
    directory.mkdir()
    (directory / "a.jsonl").write_bytes(b"\n".join(line for line, _ in DIRTY_LINES) + b"\n")
    (directory / "b.txt").write_bytes(b"text file \xc3\x28 not utf-8")
    (directory / "c.jsonl.gz").write_bytes(b"this is not gzip data")
    (directory / "d.txt").write_text("a good text file", encoding="utf-8")


def test_dirty_input_counts_every_reason(tmp_path, tokenizer):
    write_dirty_inputs(tmp_path / "in")
    summary = run([str(tmp_path / "in")], tmp_path / "out", tokenizer, max_chars=100)
    expected = {"corrupt_file": 1}
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
    lines["corrupt_file"] = [f"{tmp_path / 'in' / 'c.jsonl.gz'}:1"]
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


def compressed(lines, suffix):
    if suffix == ".gz":
        return gzip.compress(lines)
    import zstandard

    return zstandard.ZstdCompressor().compress(lines)


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_damaged_compressed_input_is_a_corrupt_file(tmp_path, tokenizer, corpus, suffix, damage):
    """Damaged from the middle on: the records before are kept and the file is counted as
    corrupt_file; a cut file is not mistaken for a malformed last line, and --on-error fail stops."""
    with open(corpus, "rb") as f:
        lines = b"".join(f.readlines(400_000))  # a few zstd blocks (128 KiB each)
    data = compressed(lines, suffix)
    half = len(data) // 2
    path = tmp_path / f"in.jsonl{suffix}"
    path.write_bytes(data[:half] if damage == "truncated" else data[:half] + bytes(b ^ 0x5A for b in data[half:]))
    summary = run([str(path)], tmp_path / "skip", tokenizer, chunk_mb=0.1)
    assert summary["skipped"]["corrupt_file"] == 1, summary["skipped"]
    assert 0 < summary["documents"] < lines.count(b"\n"), "kept nothing before the damage, or read past it"
    if damage == "truncated":  # (gzip checks its CRC only at the end: damaged deflate data decodes first)
        assert {k: v for k, v in summary["skipped"].items() if v} == {"corrupt_file": 1}, summary["skipped"]
        with pytest.raises(BadRecordError, match=rf"corrupt_file at .*in\.jsonl\{suffix}:\d+ \(truncated"):
            run([str(path)], tmp_path / "fail", tokenizer, chunk_mb=0.1, on_error="fail")


def read_stream(summary: dict, prefix) -> list[list[int]]:
    """The documents written (each ending with its EOD), read with megatron-core."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    directory = os.path.dirname(str(prefix))
    docs = []
    for shard in summary["shards"]:
        dataset = IndexedDataset(os.path.join(directory, shard["prefix"]))
        docs += [dataset[i].tolist() for i in range(len(dataset))]
    return docs


@pytest.mark.parametrize("workers", [1, 2])
def test_colliding_words_preprocess_like_the_library(tmp_path, tokenizer, docs, workers):
    """Words whose word-cache hashes collide (tests/unit/test_data_tokenizer.py) get the library's ids."""
    import sentencepiece

    first, second = colliding_words()
    # Small chunks: the words meet in one worker's cache, or in different workers at 2.
    texts = [f"{first} {docs[0][:3000]}", f"{second} {first}", f"{docs[1][:3000]} {second}", second]
    prefix = tmp_path / "out"
    summary = run([write_jsonl(tmp_path / "in.jsonl", texts)], prefix, tokenizer, workers=workers, chunk_mb=0.004)
    library = sentencepiece.SentencePieceProcessor(model_file=tokenizer)
    assert read_stream(summary, prefix) == [ids + [library.eos_id()] for ids in library.encode(texts)]


@pytest.fixture(scope="module")
def llama3(tmp_path_factory, docs):
    return byte_level_bpe(docs, str(tmp_path_factory.mktemp("llama3")), llama3=True)


BOS_DOCS = ["Hello world.", "  indented\n\tcode()", "digits 12345 and émoji 👍🏽", "<|begin_of_text|> inside"]


@pytest.mark.parametrize("flag", [[], ["--no-bos"]], ids=["default", "no_bos"])
def test_bos_template_is_megatrons_by_default_and_off_with_flag(tmp_path, llama3, flag):
    from transformers import AutoTokenizer

    prefix = tmp_path / "out"
    summary = preprocess(preprocess_options(["--input", write_jsonl(tmp_path / "in.jsonl", BOS_DOCS), "--output",
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
