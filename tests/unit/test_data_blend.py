"""Training side: documents -> .bin/.idx -> megatron GPTDataset, document boundaries, blend errors."""

import os

import numpy as np
import pytest
import torch

from pipeline.data.blend import build_datasets
from pipeline.data.config import DataConfig
from pipeline.data.corpus import documents, stdlib_files
from pipeline.data.preprocess import PreprocessOptions, preprocess
from pipeline.data.sentencepiece_training import train_sentencepiece_bpe
from pipeline.data.tokenizer import load_tokenizer
from pipeline.errors import ConfigError, DataError
from pipeline.training.batches import cu_seqlens_for_batch, cu_seqlens_from_tokens

SEQ = 64


@pytest.fixture(scope="module")
def texts():
    """Short documents, each with a unique opening, so a window can be traced to its documents."""
    snippets = [d["text"] for d in documents(stdlib_files()[:20])]
    return [f"doc {i}: " + snippets[i % len(snippets)][: 40 + (37 * i) % 300] for i in range(300)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, texts):
    out = str(tmp_path_factory.mktemp("tok"))
    train_sentencepiece_bpe(texts, out, vocab_size=700)
    return os.path.join(out, "tokenizer.model")


def make_dataset(directory, name, texts, tokenizer):
    import json

    directory.mkdir(parents=True, exist_ok=True)
    source = directory / f"{name}.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    prefix = str(directory / name)
    preprocess(
        PreprocessOptions(
            inputs=[str(source)],
            output=prefix,
            tokenizer=tokenizer,
            workers=1,
            progress=False,
            chunk_mb=0.01,
            shard_mb=0.02,
        )
    )
    return prefix


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, texts, tokenizer):
    return make_dataset(tmp_path_factory.mktemp("data"), "docs", texts, tokenizer)


def config(dataset, tokenizer, tmp_path, **overrides):
    fields = dict(
        tokenizer=tokenizer, paths=[dataset], weights=[1.0], split="90,10,0", cache_dir=str(tmp_path / "cache")
    )
    return DataConfig(**{**fields, **overrides})


def test_builds_on_cpu_without_torch_distributed(dataset, tokenizer, tmp_path):
    assert not torch.distributed.is_initialized()
    train, valid, test = build_datasets(config(dataset, tokenizer, tmp_path), SEQ, 1, (50, 10, 0))
    assert len(train) >= 50 and len(valid) >= 10 and test is None
    assert os.listdir(tmp_path / "cache"), "no index cache written"


def test_samples_are_windows_of_tokenized_documents(dataset, tokenizer, texts, tmp_path):
    tok = load_tokenizer(tokenizer)
    docs = [tuple(ids + [tok.eod]) for ids in tok.encode(texts)]
    whole = set(docs)
    train, _, _ = build_datasets(config(dataset, tokenizer, tmp_path), SEQ, 1, (100, 10, 0))
    for i in range(len(train)):
        sample = train[i]
        assert torch.equal(sample["tokens"][1:], sample["labels"][:-1]), "labels are not shifted tokens"
        stream = sample["tokens"].tolist() + sample["labels"][-1:].tolist()
        cuts = [p + 1 for p, t in enumerate(stream) if t == tok.eod]
        pieces = [tuple(stream[a:b]) for a, b in zip([0] + cuts, cuts + [len(stream)]) if a < b]
        if len(pieces) == 1:
            assert any(contains(d, pieces[0]) for d in docs), f"sample {i}: not inside any document"
            continue
        assert any(d[-len(pieces[0]) :] == pieces[0] for d in docs), f"sample {i}: starts mid-nowhere"
        assert all(p in whole for p in pieces[1:-1]), f"sample {i}: an inner piece is no whole document"
        assert any(d[: len(pieces[-1])] == pieces[-1] for d in docs), f"sample {i}: ends mid-nowhere"


def contains(whole, part):
    return any(whole[k : k + len(part)] == part for k in range(len(whole) - len(part) + 1))


@pytest.mark.filterwarnings("ignore:Could not determine rank")
def test_boundaries_match_megatron_document_lengths(dataset, tokenizer, tmp_path):
    """Our EOD-derived cu_seqlens equal megatron's own, computed from the stored document lengths."""
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import Split

    from pipeline.data.blend import MegatronTokenizerView

    tok = load_tokenizer(tokenizer)
    cfg = GPTDatasetConfig(
        random_seed=3,
        sequence_length=SEQ,
        blend=([f"{dataset}_00000"], None),
        split="100,0,0",
        path_to_cache=str(tmp_path),
        tokenizer=MegatronTokenizerView(tok),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        inter_document_masking=True,
    )
    indexed = IndexedDataset(f"{dataset}_00000")
    data = GPTDataset(indexed, None, np.arange(len(indexed), dtype=np.int32), 40, Split.train, cfg)
    multi = 0
    for i in range(len(data)):
        sample = data[i]
        theirs = sample["cu_seqlens"]
        theirs = theirs[: int(torch.nonzero(theirs == SEQ)[0]) + 1]
        ours = cu_seqlens_from_tokens(sample["tokens"], tok.eod)
        assert ours.dtype == torch.int32 and ours[0] == 0 and ours[-1] == SEQ
        assert ours.tolist() == theirs.tolist(), f"sample {i}"
        multi += len(ours) > 2
    assert multi > len(data) // 2, "too few samples with several documents to test boundaries"


def test_cu_seqlens_examples():
    eod = 9
    assert cu_seqlens_from_tokens(torch.tensor([1, 2, 9, 3, 4]), eod).tolist() == [0, 3, 5]
    assert cu_seqlens_from_tokens(torch.tensor([1, 9, 9, 2, 9]), eod).tolist() == [0, 2, 3, 5]
    assert cu_seqlens_from_tokens(torch.tensor([1, 2, 3]), eod).tolist() == [0, 3]
    batch = torch.tensor([[1, 9, 2], [3, 4, 5]])
    assert cu_seqlens_for_batch(batch, eod)[0].tolist() == [0, 2, 3, 6]


def test_blend_draws_by_weight(tmp_path, texts, tokenizer, dataset):
    other = make_dataset(tmp_path / "other", "other", texts[::-1], tokenizer)
    cfg = config(dataset, tokenizer, tmp_path, paths=[dataset, other], weights=[3.0, 1.0])
    train, _, _ = build_datasets(cfg, SEQ, 1, (400, 10, 0))
    # Each dataset has several shards: map every shard's id back to its dataset by prefix.
    owners = [os.path.basename(d.dataset_path).startswith("docs") for d in train.datasets]
    from_first = sum(owners[int(train[i]["dataset_id"])] for i in range(len(train)))
    assert abs(from_first / len(train) - 0.75) < 0.02


def test_missing_prefix_is_a_data_error(tokenizer, tmp_path):
    cfg = config(str(tmp_path / "absent"), tokenizer, tmp_path)
    with pytest.raises(DataError, match=r"data.paths\[0\].*no dataset there"):
        build_datasets(cfg, SEQ, 1, (10, 1, 0))


def test_interrupted_dataset_is_a_data_error(tokenizer, tmp_path):
    (tmp_path / "half.progress.json").write_text("{}")
    with pytest.raises(DataError, match="incomplete"):
        build_datasets(config(str(tmp_path / "half"), tokenizer, tmp_path), SEQ, 1, (10, 1, 0))


def test_vocabulary_mismatch_is_a_data_error(tmp_path, texts, dataset):
    other = str(tmp_path / "tok")
    train_sentencepiece_bpe(texts[:100], other, vocab_size=600)
    with pytest.raises(DataError, match="fingerprint"):
        build_datasets(config(dataset, other, tmp_path), SEQ, 1, (10, 1, 0))


def test_model_vocabulary_too_small_is_a_config_error(dataset, tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="model.vocab_size"):
        build_datasets(config(dataset, tokenizer, tmp_path), SEQ, 1, (10, 1, 0), model_vocab_size=512)


@pytest.mark.parametrize("split, empty", [("999,1,0", "valid"), ("90,10,0.1", "test")])
def test_split_without_documents_is_a_config_error(dataset, tokenizer, tmp_path, split, empty):
    # The test split gets no samples asked of it, yet megatron would loop forever building it.
    with pytest.raises(ConfigError, match=f"{empty} split"):
        build_datasets(config(dataset, tokenizer, tmp_path, split=split), SEQ, 1, (10, 1, 0))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(weights=[0.0]), r"data.weights\[0\]=0.0 must be > 0"),
        (dict(weights=[-1.0]), r"data.weights\[0\]=-1.0 must be > 0"),
        (dict(weights=[1.0, 1.0]), "one weight per path"),
        (dict(paths=[]), "data.paths is empty"),
        (dict(split="90,10"), "three non-negative numbers"),
        (dict(split="0,1,0"), "nothing to train on"),
    ],
)
def test_bad_data_config_is_a_one_line_error(overrides, message):
    fields = dict(tokenizer="t", paths=["p"], weights=[1.0])
    with pytest.raises(ConfigError, match=message) as info:
        DataConfig(**{**fields, **overrides})
    assert "\n" not in str(info.value)


def copy_dataset(prefix, directory):
    """A copy of the dataset at `prefix` (summary and shards) in `directory`, to damage."""
    import shutil

    directory.mkdir()
    source, name = os.path.split(prefix)
    for file in os.listdir(source):
        if file.startswith(name) and file.endswith((".json", ".bin", ".idx")):
            shutil.copy(os.path.join(source, file), directory / file)
    return str(directory / name)


def truncate(path, by):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - by)


def overwrite(path, data, at_end=True):
    with open(path, "r+b") as f:
        f.seek(-len(data) if at_end else 0, os.SEEK_END if at_end else os.SEEK_SET)
        f.write(data)


def append(path, data):
    with open(path, "ab") as f:
        f.write(data)


# (file of the first shard, how it is damaged, what the message must say)
DAMAGE = [
    (".bin", lambda p: truncate(p, 10), "when written"),
    (".idx", lambda p: truncate(p, 8), "when written"),
    (".bin", os.remove, "missing"),
    (".idx", os.remove, "missing"),
    (".bin", lambda p: append(p, b"\0\0"), "when written"),
    (".idx", lambda p: overwrite(p, b"garbage!!", at_end=False), "index header"),
    (".idx", lambda p: overwrite(p, b"\x07" * 8), "differs from the file written"),
    (".bin", lambda p: overwrite(p, b"\xff\xff"), "differs from the file written"),
]


@pytest.mark.parametrize("ext, damage, message", DAMAGE)
def test_damaged_shard_fails_at_setup_naming_the_file(tmp_path, dataset, tokenizer, ext, damage, message):
    prefix = copy_dataset(dataset, tmp_path / "data")
    damage(f"{prefix}_00000{ext}")
    with pytest.raises(DataError, match=message) as info:
        build_datasets(config(prefix, tokenizer, tmp_path), SEQ, 1, (10, 1, 0))
    line = str(info.value)
    assert f"docs_00000{ext}" in line and "--overwrite" in line and "\n" not in line


@pytest.mark.parametrize(
    "ext, damage, message",
    [
        (".bin", lambda p: truncate(p, 10), "bytes but .* indexes"),
        (".idx", lambda p: truncate(p, 8), "header implies"),
        (".idx", lambda p: overwrite(p, b"garbage!!", at_end=False), "index header"),
    ],
)
def test_damaged_plain_megatron_prefix_fails_at_setup(tmp_path, dataset, tokenizer, ext, damage, message):
    """A prefix without a preprocessing summary is checked for consistency of its .idx and .bin."""
    plain = copy_dataset(dataset, tmp_path / "data") + "_00000"
    damage(plain + ext)
    with pytest.raises(DataError, match=message) as info:
        build_datasets(config(plain, tokenizer, tmp_path), SEQ, 1, (10, 1, 0))
    assert f"docs_00000{ext}" in str(info.value)
