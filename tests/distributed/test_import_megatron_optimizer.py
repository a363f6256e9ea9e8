"""`convert.py import-megatron` with the optimizer formats other than fully_reshardable, on genuine
Megatron-LM checkpoints saved at DP 2 (tests/distributed/worker_megatron_lm.py):

- `fully_sharded_model_space` (core <= 0.14, NeMo 2 recipes): read at any layout;
- `dp_reshardable` (Megatron-LM's default): read at the source's TP/PP (any DP), else (with
  --with-optimizer) a one-line refusal.

Resumed, the step after the import matches the source's next step bit for bit."""

import shutil
import sys

import pytest
import torch

from pipeline.checkpoint import CheckpointMeta
from tests.distributed.test_import_megatron import WORKER, import_cli, step_after_import
from tests.distributed.test_import_megatron_sources import (
    ITER,
    MODEL_CONFIG,
    cli,
    refused,
    rename_in_metadata,
    write_run_config,
)
from tests.distributed.training import run_cpu
from tests.distributed.worker_megatron_lm import SAVE_FORMATS_FLAG

STEP = "step_0000002"


def megatron_dp2(root, *flags):
    """A Megatron-LM save dir written at TP1/PP1/DP2 (two processes; the distributed optimizer cuts
    parameters between the two ranks' shards)."""
    run_cpu([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER, str(root),
             *flags])
    return root


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One DP2 run saved in both formats (a source dir each): one 2-process launch instead of two."""
    return megatron_dp2(tmp_path_factory.mktemp("dp2"), SAVE_FORMATS_FLAG, "model_space,dp_reshardable")


@pytest.fixture(scope="module")
def model_space(sources):
    return sources / "model_space"


@pytest.fixture(scope="module")
def dp_reshardable(sources):
    return sources / "dp_reshardable"


def assert_continues(imported, source, tmp_path, nproc: int = 1, *overrides) -> None:
    ref = torch.load(source / "reference.pt")
    got = step_after_import(imported, source / "reference.pt", tmp_path / "r.json", nproc, *overrides)
    assert got["step"] == 2
    # The same fp32 arithmetic at TP1 (DP changes the order of nothing here): bit for bit, the Adam
    # step included (fresh moments instead land ~1e-3 away).
    assert (got["loss"], got["loss_after_step"]) == (ref["loss"], ref["loss_after_step"]), (got, ref)


def test_model_space_state_continues_at_another_layout(model_space, tmp_path):
    # Imported at TP2 (each rank reads the rows of the old layout it needs), resumed at TP1/DP1.
    proc = import_cli(model_space / "ckpt", tmp_path / "imported", "parallel.tp=2", "--with-optimizer")
    assert "(weights and optimizer state)" in proc.stdout, proc.stdout
    meta = CheckpointMeta.read(tmp_path / "imported" / "checkpoints" / STEP)
    assert not meta.weights_only and meta.parallel["tp"] == 2
    assert meta.imported_from["optimizer"] == "fully_sharded_model_space"
    assert_continues(tmp_path / "imported", model_space, tmp_path)


def older_common_state(source, tmp_path, content_metadata: bool = False, **args):
    """A copy of `source` whose common state is changed: the args in `args` set (None: the optimizer's
    entry of that name deleted), and without content metadata, as a Megatron-LM < core 0.13 saved."""
    from pipeline.migrate.source import read_common_state

    ckpt = tmp_path / "ckpt"
    shutil.copytree(source / "ckpt", ckpt)
    state = read_common_state(ckpt / ITER)
    if not content_metadata:
        del state["content_metadata"]
    for name, value in args.items():
        if value is None:
            del state["optimizer"][name]
        else:
            setattr(state["args"], name, value)
    torch.save(state, ckpt / ITER / "common.pt")  # core <= 0.18's common state, read in preference
    return ckpt


@pytest.mark.parametrize("args, expected", [
    ({}, "fully_sharded_model_space"),  # the type stored with the state
    ({"param_state_sharding_type": None, "ckpt_fully_parallel_save": True}, "fully_sharded_model_space"),
    ({"param_state_sharding_type": None, "ckpt_fully_parallel_save": False}, "dp_zero_gather_scatter"),
], ids=["stored", "fully_parallel_save", "gather_scatter"])
def test_format_of_a_checkpoint_without_content_metadata(model_space, tmp_path, args, expected):
    """Before core 0.13: megatron.training's rule, the stored type, else --ckpt-fully-parallel-save."""
    from pipeline.distributed import ParallelConfig
    from pipeline.migrate.source import open_source

    ckpt = older_common_state(model_space, tmp_path, **args)
    source = open_source(ckpt)
    assert source.optimizer_format == expected
    refused_why = source.optimizer_refused(ParallelConfig(tp=2))
    assert refused_why is None if expected == "fully_sharded_model_space" else "cannot read" in refused_why
    if not args:  # as such a checkpoint is: its state loads without the content metadata
        cli(ckpt, tmp_path / "imported", "--with-optimizer")
        assert not CheckpointMeta.read(tmp_path / "imported" / "checkpoints" / STEP).weights_only


def test_dp_reshardable_state_continues_at_its_own_layout(dp_reshardable, tmp_path, capsys):
    cli(dp_reshardable / "ckpt", tmp_path / "imported", "--with-optimizer")
    out = capsys.readouterr().out
    assert "(weights and optimizer state)" in out and "weights only" not in out, out
    meta = CheckpointMeta.read(tmp_path / "imported" / "checkpoints" / STEP)
    assert not meta.weights_only and meta.imported_from["optimizer"] == "dp_reshardable"
    assert_continues(tmp_path / "imported", dp_reshardable, tmp_path)


def test_dp_reshardable_state_at_another_layout_is_refused_when_asked_for(dp_reshardable, tmp_path, capsys):
    # Without --with-optimizer the weights alone come along, with a note (test_import_megatron.py:
    # test_tp2pp2_weights_start_a_tp1_run).
    error = refused(capsys, dp_reshardable / "ckpt", tmp_path / "refused", "parallel.tp=2", "--with-optimizer")
    assert "dp_reshardable format, which loads only at its own layout (tp=1 pp=1 ep=1 vpp=1" in error, error
    assert not (tmp_path / "refused").exists()
    error = refused(capsys, dp_reshardable / "ckpt", tmp_path / "refused", "--with-optimizer", "--weights-only")
    assert "not allowed with argument" in error, error


def test_dp_reshardable_buckets_laid_out_otherwise_are_refused(dp_reshardable, tmp_path, capsys):
    # The source's args claiming 100k-element buckets: the buckets built here are not the stored ones.
    error = refused(capsys, older_common_state(dp_reshardable, tmp_path, content_metadata=True,
                                               overlap_grad_reduce=True, ddp_bucket_size=100_000), tmp_path / "out")
    assert "dp_reshardable optimizer bucket" in error and "--weights-only" in error, error
    assert not (tmp_path / "out").exists()


def test_dp_reshardable_parameters_in_another_order_are_refused(dp_reshardable, tmp_path, capsys):
    # Two parameters of one shape swapped by name (as a writer that orders its buckets otherwise would
    # place them): the buckets have the right sizes, but the Adam state would land on the wrong one.
    ckpt = tmp_path / "ckpt"
    shutil.copytree(dp_reshardable / "ckpt", ckpt)
    rename_in_metadata(ckpt / ITER, {"mixer.D": "mixer.SWAP", "mixer.dt_bias": "mixer.D",
                                     "mixer.SWAP": "mixer.dt_bias"})
    error = refused(capsys, ckpt, tmp_path / "out")
    assert "does not line up with the weights" in error and "--weights-only" in error, error
    assert not (tmp_path / "out").exists()


def test_bridge_dp_reshardable_state(dp_reshardable, tmp_path, capsys):
    """Bridge records its layout and DDP settings in run_config.yaml (`model:`, `ddp:`)."""
    bridge = tmp_path / "bridge"
    shutil.copytree(dp_reshardable / "ckpt", bridge)
    write_run_config(bridge / ITER, {**MODEL_CONFIG, "tensor_model_parallel_size": 1})
    cli(bridge, tmp_path / "imported", "--with-optimizer")
    meta = CheckpointMeta.read(tmp_path / "imported" / "checkpoints" / STEP)
    assert meta.imported_from["kind"] == "bridge" and not meta.weights_only
