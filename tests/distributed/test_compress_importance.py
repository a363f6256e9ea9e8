"""Importance scores do not depend on the parallel layout: TP=2 and PP=2 (gloo) equal TP=1; for a
`tiny_moe` parent, experts split over two ranks (EP2, with DP2) or each expert split (ETP2) equal one
process."""

import dataclasses
from pathlib import Path

import pytest
import torch

from pipeline.compress.importance import score_importance
from pipeline.compress.scores import load_scores
from pipeline.config import load_run_config
from tests.distributed.launch import torchrun
from tests.unit.test_compress_importance import CALIBRATION, make_parent

WORKER = Path(__file__).with_name("worker_compress_importance.py")


def _flat(scores) -> dict[str, torch.Tensor]:
    out = {"hidden": scores.hidden, **{f"layers.{m}": t for m, t in scores.layers.items()}}
    for kind, per_layer in scores.units.items():
        out.update({f"{kind}.{i}": t for i, t in per_layer.items()})
    return out


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
    """The parent (under root) and its scores at TP=1, in this process."""
    root = tmp_path_factory.mktemp("parent")
    make_parent(root)
    common = [*CALIBRATION, f"compress.parent={root}"]
    return common, _flat(load_scores(score_importance(load_run_config([*common, f"run_dir={root / 'tp1'}"]))))


@pytest.fixture(scope="module")
def moe_ep1(tmp_path_factory):
    """A `tiny_moe` parent (its initial weights) and its scores in one process."""
    from pipeline import checkpoint as ckpt
    from pipeline.distributed import distributed
    from pipeline.model.build import build_model

    root = tmp_path_factory.mktemp("moe_parent")
    run = load_run_config(["device=cpu", "precision=fp32", "model=tiny_moe"])
    with distributed(run.parallel, None, "cpu") as world:
        chunks = build_model(run.model, run.parallel, run.precision, run.train.seed, world.device)
        meta = ckpt.CheckpointMeta(step=1, model=dataclasses.asdict(run.model))
        ckpt.save_checkpoint(root / "parent" / "checkpoints", 1, ckpt.model_sharded_state(chunks), meta, "")
    common = [*CALIBRATION, f"compress.parent={root / 'parent'}"]
    return common, _flat(load_scores(score_importance(load_run_config([*common, f"run_dir={root / 'ep1'}"]))))


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.pp=2"]], ids=["tp2", "pp2"])
def test_scores_at_another_layout_equal_tp1(tp1, tmp_path, layout):
    _compare(tp1, tmp_path, layout)


@pytest.mark.parametrize("layout", [["parallel.ep=2"], ["parallel.etp=2"]], ids=["ep2", "etp2"])
def test_moe_scores_at_another_expert_layout_equal_one_process(moe_ep1, tmp_path, layout):
    _compare(moe_ep1, tmp_path, layout)


def _compare(one_process, tmp_path, layout):
    common, reference = one_process
    torchrun(WORKER, 2, *common, f"run_dir={tmp_path}", *layout)
    other = _flat(load_scores(tmp_path / "compress" / "scores"))
    assert other.keys() == reference.keys()
    bad = {}
    for key, ref in reference.items():
        err = ((other[key] - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
        if err > 1e-5:
            bad[key] = err
    assert not bad, f"scores differ from TP=1 (relative max error) at {layout}: {bad}"
