"""Opening a checkpoint never runs code from it: the pickled parts are read through an allow-list
(pipeline/checkpoint/safe_loading.py, docs/checkpoints.md), and the trainer's own state holds no pickle.
(The trainer refusing a crafted `.metadata`: tests/distributed/test_run_faults.py.)"""

import io
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.checkpoint import CheckpointMeta, fingerprint, load_checkpoint, save_checkpoint
from pipeline.distributed import ParallelConfig, distributed
from pipeline.errors import UnsafeCheckpointError
from pipeline.training.state import rng_state, set_rng_state
from tests.distributed.worker_hf_checkpoint import make_tokenizer, write_checkpoint

REPO = Path(__file__).resolve().parents[2]


class RunsCommand:
    """Unpickling this runs `touch marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def craft_metadata(step: Path, marker: Path) -> None:
    """Replace step/.metadata by a pickle that runs a command, keeping meta.json's record consistent."""
    import json

    (step / ".metadata").write_bytes(pickle.dumps(RunsCommand(marker)))
    meta = json.loads((step / "meta.json").read_text())
    meta["files"][".metadata"] = fingerprint(step / ".metadata")
    (step / "meta.json").write_text(json.dumps(meta))


def test_export_refuses_a_crafted_metadata_without_running_it(tmp_path):
    write_checkpoint(tmp_path / "run", make_tokenizer(tmp_path / "tokenizer", 1000), [], reference=False)
    step = tmp_path / "run" / "checkpoints" / "step_0000000"
    marker = tmp_path / "pwned"
    craft_metadata(step, marker)
    proc = subprocess.run(
        [sys.executable, "pipeline/convert.py", "export", str(tmp_path / "run"), str(tmp_path / "out")],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line, line
    assert str(step / ".metadata") in line and "posix.system" in line and "allow-list" in line, line
    assert not marker.exists(), "the pickled command ran"
    assert not (tmp_path / "out").exists()


def test_a_stored_object_that_would_run_code_is_refused(tmp_path):
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    marker = tmp_path / "pwned"
    meta = CheckpointMeta(step=1, model={}, parallel={"tp": 1, "pp": 1, "dp": 1, "world_size": 1})
    with distributed(ParallelConfig(), None, "cpu"):
        state = {"w": ShardedTensor.from_rank_offsets("w", torch.ones(4)),
                 "obj": ShardedObject("obj", RunsCommand(marker), (1,), (0,))}
        step = save_checkpoint(tmp_path, 1, state, meta, "")
        template = {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(4)),
                    "obj": ShardedObject("obj", None, (1,), (0,))}
        with pytest.raises(UnsafeCheckpointError, match="stored object obj"):
            load_checkpoint(step, template)
    assert not marker.exists(), "the pickled command ran"


def test_rng_state_round_trips_as_plain_tensors():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


@pytest.mark.parametrize("force_unsafe", ["0", "1"])
def test_a_legacy_common_pt_is_read_through_the_allow_list(tmp_path, monkeypatch, force_unsafe):
    # megatron's loader reads a legacy common.pt with a bare torch.load, which
    # TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns into a full unpickle.
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", force_unsafe)
    marker = tmp_path / "pwned"
    meta = CheckpointMeta(step=1, model={}, parallel={"tp": 1, "pp": 1, "dp": 1, "world_size": 1})
    with distributed(ParallelConfig(), None, "cpu"):
        step = save_checkpoint(tmp_path, 1, {"w": ShardedTensor.from_rank_offsets("w", torch.ones(4))}, meta, "")
        torch.save({"args": RunsCommand(marker)}, step / "common.pt")
        with pytest.raises(UnsafeCheckpointError, match="common.pt.*posix.system.*allow") as info:
            load_checkpoint(step, {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(4))})
    assert not marker.exists(), "the pickled command ran"
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("force_unsafe", ["0", "1"])
def test_a_stored_object_is_refused_whatever_the_environment(tmp_path, monkeypatch, force_unsafe):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", force_unsafe)
    test_a_stored_object_that_would_run_code_is_refused(tmp_path)
