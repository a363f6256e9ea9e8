"""Every reader of a checkpoint (export, a compression parent, the loader, the tensor reader) checks it
through `verify_checkpoint` first, and no path the checkpoint names (`latest`, meta.json's file
entries, `relative_path` in torch's `.metadata`) leads outside its directory. (Choosing the checkpoint
to resume: test_checkpoint_damage.py.)"""

import json
import pickle
import shutil
from pathlib import Path

import pytest

from pipeline import checkpoint as ckpt
from pipeline.compress.parent import open_parent
from pipeline.convert import main
from pipeline.errors import CheckpointError, UnsafeCheckpointError
from tests.distributed.worker_hf_checkpoint import make_tokenizer, write_checkpoint

STEP = "step_0000000"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readers")
    write_checkpoint(root / "run", make_tokenizer(root / "tokenizer", 1000), [], reference=False)
    return root / "run"


@pytest.fixture
def run(source, tmp_path) -> Path:
    return shutil.copytree(source, tmp_path / "run")


def zero_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle - 64 : middle + 64] = bytes(128)
    path.write_bytes(bytes(data))


def shard(run: Path) -> Path:
    return next((run / "checkpoints" / STEP).glob("*.distcp"))


def export_error(capsys, run: Path, out: Path) -> str:
    with pytest.raises(SystemExit) as info:
        main(["export", str(run), str(out)])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.startswith("error: ") and "\n" not in err, (info.value.code, err)
    assert not out.exists()
    return err


def test_export_refuses_zeroed_bytes(capsys, run, tmp_path):
    zero_middle(shard(run))
    assert "checksum" in export_error(capsys, run, tmp_path / "out")


def test_export_refuses_a_missing_torch_metadata(capsys, run, tmp_path):
    (run / "checkpoints" / STEP / ".metadata").unlink()
    assert ".metadata is missing" in export_error(capsys, run, tmp_path / "out")


def test_a_compression_parent_with_zeroed_bytes_is_refused(run):
    zero_middle(shard(run))
    with pytest.raises(CheckpointError, match="checksum"):
        open_parent(run)


def test_the_loader_refuses_zeroed_bytes(run):
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from pipeline.distributed import ParallelConfig, distributed

    step = run / "checkpoints" / STEP
    shape = ckpt.CheckpointTensors(step).shapes["embedding.word_embeddings.weight"]
    zero_middle(shard(run))
    with distributed(ParallelConfig(), None, "cpu"):
        template = {"e": ShardedTensor.from_rank_offsets("embedding.word_embeddings.weight", torch.zeros(shape))}
        with pytest.raises(CheckpointError, match="checksum"):
            ckpt.load_checkpoint(step, template)


@pytest.mark.parametrize("name", ["../../../outside.distcp", "/etc/hostname"])
def test_a_file_entry_outside_the_checkpoint_is_refused(run, tmp_path, name):
    step = run / "checkpoints" / STEP
    (tmp_path / "outside.distcp").write_bytes(b"x")
    meta = json.loads((step / "meta.json").read_text())
    meta["files"][name] = ckpt.fingerprint(Path(name) if name.startswith("/") else step / name)
    (step / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UnsafeCheckpointError, match="outside"):
        ckpt.verify_checkpoint(step)


def test_a_latest_pointer_leading_outside_is_not_followed(run, tmp_path):
    elsewhere = shutil.copytree(run, tmp_path / "elsewhere")
    (elsewhere / "checkpoints" / STEP / "meta.json").write_text(
        (elsewhere / "checkpoints" / STEP / "meta.json").read_text().replace('"step": 0', '"step": 7')
    )
    (run / "checkpoints" / "latest").write_text(f"{STEP}/../../../elsewhere/checkpoints/{STEP}")
    assert ckpt.latest_checkpoint(run / "checkpoints") == run / "checkpoints" / STEP
    assert ckpt.resolve_checkpoint(run) == run / "checkpoints" / STEP


def test_a_relative_path_outside_the_checkpoint_is_refused(run, tmp_path):
    step = run / "checkpoints" / STEP
    outside = tmp_path / "outside"
    outside.mkdir()
    stored = shard(run)
    shutil.copy(stored, outside / stored.name)
    metadata = pickle.loads((step / ".metadata").read_bytes())  # our own checkpoint: trusted here
    for info in metadata.storage_data.values():
        info.relative_path = f"../../../outside/{info.relative_path}"
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    meta = json.loads((step / "meta.json").read_text())
    meta["files"][".metadata"] = ckpt.fingerprint(step / ".metadata")
    (step / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UnsafeCheckpointError, match="outside"):
        ckpt.CheckpointTensors(step)
