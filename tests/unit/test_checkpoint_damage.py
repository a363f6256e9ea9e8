"""Choosing the checkpoint to resume: every kind of damage to the newest one is named in one warning
line and the newest intact one is used instead; never silently, never from scratch while damaged
checkpoints exist. (A damaged checkpoint met by the real trainer: tests/distributed/test_run_faults.py.)"""

import os
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import CheckpointMeta, find_resumable, save_checkpoint
from pipeline.distributed import ParallelConfig, distributed
from pipeline.errors import CheckpointError


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """checkpoints/ with step_0000001 and step_0000002 (one 256x256 fp32 tensor each)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    root = tmp_path_factory.mktemp("damage") / "checkpoints"
    with distributed(ParallelConfig(), None, "cpu"):
        for step in (1, 2):
            weight = torch.full((256, 256), float(step))
            meta = CheckpointMeta(step=step, model={}, parallel={"tp": 1, "pp": 1, "dp": 1, "world_size": 1})
            save_checkpoint(root, step, {"w": ShardedTensor.from_rank_offsets("w", weight)}, meta, "")
    return root


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


DAMAGE = {
    "truncated shard": (lambda d: truncate(d / "__0_0.distcp"), "bytes, "),
    "garbage shard": (lambda d: garbage(d / "__0_0.distcp"), "checksum"),
    "deleted .metadata": (lambda d: (d / ".metadata").unlink(), ".metadata is missing"),
    "garbage .metadata": (lambda d: garbage(d / ".metadata"), "checksum"),
    "garbage meta.json": (lambda d: (d / "meta.json").write_text('{"step": 2, "mod'), "meta.json is unreadable"),
    "missing meta.json": (lambda d: (d / "meta.json").unlink(), "meta.json is missing"),
    "missing COMPLETE": (lambda d: (d / "COMPLETE").unlink(), "COMPLETE"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_newest_checkpoint_is_named_and_skipped(checkpoints, tmp_path, kind):
    root = shutil.copytree(checkpoints, tmp_path / "checkpoints")
    damage, reason = DAMAGE[kind]
    damage(root / "step_0000002")
    warnings = []
    found = find_resumable(root, warnings.append)
    assert found == root / "step_0000001", f"{kind}: resumed from {found}"
    named = [w for w in warnings if str(root / "step_0000002") in w]
    assert named and named[0].startswith("WARNING:") and reason in named[0], f"{kind}: {warnings}"
    assert all("\n" not in w for w in warnings)
    assert any("older checkpoint" in w for w in warnings), f"{kind}: the fallback itself is not announced: {warnings}"


def test_garbage_latest_pointer_is_named_and_the_newest_intact_used(checkpoints, tmp_path):
    root = shutil.copytree(checkpoints, tmp_path / "checkpoints")
    (root / "latest").write_bytes(b"\x00\xffgarbage")
    warnings = []
    assert find_resumable(root, warnings.append) == root / "step_0000002"
    assert len(warnings) == 1 and str(root / "latest") in warnings[0], warnings


def test_intact_checkpoints_resume_from_the_newest_without_warnings(checkpoints):
    warnings = []
    assert find_resumable(checkpoints, warnings.append) == checkpoints / "step_0000002"
    assert warnings == []


def test_only_damaged_checkpoints_refuse_instead_of_starting_over(checkpoints, tmp_path):
    root = shutil.copytree(checkpoints, tmp_path / "checkpoints")
    for step in ("step_0000001", "step_0000002"):
        (root / step / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="no intact checkpoint") as info:
        find_resumable(root, lambda line: None)
    assert "\n" not in str(info.value)
