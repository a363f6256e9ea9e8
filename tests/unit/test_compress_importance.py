"""Importance scores: planted signals come out where they must, runs repeat exactly, and the scores
file knows its parent."""

import dataclasses

import pytest
import torch

from pipeline import checkpoint as ckpt
from pipeline.checkpoint import save_checkpoint
from pipeline.compress.importance import score_importance
from pipeline.compress.scores import LAYER_METRICS, ParentIdentity, load_scores
from pipeline.config import load_run_config
from pipeline.distributed import distributed
from pipeline.errors import CheckpointError, ConfigError
from pipeline.model.build import build_model
from pipeline.model.init import global_param_names

pytestmark = pytest.mark.usefixtures("default_corpus")  # calibration reads the default tokenizer and data

MODEL = [
    "model.name=parent", "model.pattern=M*-M-*", "model.hidden_size=32", "model.ffn_hidden_size=48",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.kv_channels=8", "model.mamba_num_heads=4",
    "model.mamba_num_groups=2", "model.mamba_head_dim=8", "model.mamba_state_dim=8", "model.mamba_chunk_size=16",
    "model.seq_length=64",
]
CALIBRATION = [
    "device=cpu", "precision=fp32", "train.seq_length=64", "train.micro_batch_size=2",
    "compress.calibration_samples=8", "compress.layer_calibration_samples=4",
]
DEAD_NEURON = (2, 7)  # layer 2 (FFN), neuron 7: its fc1 row is zero
DEAD_LAYER = 3  # a Mamba layer whose out_proj is zero: it adds nothing to the residual stream


def make_parent(root, model_overrides=MODEL):
    """A random fp32 parent with the planted dead neuron and dead layer, saved under root/checkpoints."""
    run = load_run_config(["device=cpu", "precision=fp32", "train.seq_length=64", *model_overrides])
    with distributed(run.parallel, None, "cpu") as world:
        (chunk,) = build_model(run.model, run.parallel, run.precision, run.train.seed, world.device)
        p = global_param_names(chunk)
        with torch.no_grad():
            layer, neuron = DEAD_NEURON
            p[f"decoder.layers.{layer}.mlp.linear_fc1.weight"][neuron] = 0
            p[f"decoder.layers.{DEAD_LAYER}.mixer.out_proj.weight"].zero_()
        meta = ckpt.CheckpointMeta(step=1, model=dataclasses.asdict(run.model))
        return save_checkpoint(root / "checkpoints", 1, ckpt.model_sharded_state([chunk]), meta, "")


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    root = tmp_path_factory.mktemp("importance")
    step = make_parent(root)
    paths = [
        score_importance(load_run_config([*CALIBRATION, f"compress.parent={root}", f"run_dir={root / f'run{i}'}"]))
        for i in range(2)
    ]
    meta = ckpt.read_meta(step)
    identity = ParentIdentity(str(step.resolve()), meta.step, meta.model)
    return [load_scores(p, identity) for p in paths], identity, paths


def test_dead_ffn_neuron_is_ranked_last(scored):
    (scores, _), _, _ = scored
    layer, neuron = DEAD_NEURON
    ffn = scores.units["ffn"][layer]
    assert ffn[neuron] == 0 and int(ffn.argmin()) == neuron, ffn
    assert (ffn[torch.arange(ffn.numel()) != neuron] > 0).all(), "only the dead neuron may score 0"


@pytest.mark.parametrize("metric", ["block_influence", "logit_mse_increase"])
def test_layer_with_zero_output_is_least_important(scored, metric):
    (scores, _), _, _ = scored
    values = scores.layers[metric]
    assert int(values.argmin()) == DEAD_LAYER, f"{metric}: {values.tolist()}"
    assert values[DEAD_LAYER].abs() < 1e-9 and (values[torch.arange(6) != DEAD_LAYER] > 0).all(), values


def test_removing_a_layer_with_zero_output_does_not_change_the_loss(scored):
    (scores, _), _, _ = scored
    assert abs(float(scores.layers["loss_increase"][DEAD_LAYER])) < 1e-6, scores.layers["loss_increase"]


def test_every_unit_and_layer_has_a_score(scored):
    (scores, _), _, _ = scored
    assert set(scores.layers) == set(LAYER_METRICS)
    assert sorted(scores.units["mamba_heads"]) == [0, 3] and sorted(scores.units["query_heads"]) == [1, 5]
    assert scores.units["mamba_channels"][0].shape == (8,) and scores.hidden.shape == (32,)
    assert scores.samples == 8


def test_scores_are_deterministic(scored):
    (a, b), _, _ = scored
    assert torch.equal(a.hidden, b.hidden)
    for kind, per_layer in a.units.items():
        for i, t in per_layer.items():
            assert torch.equal(t, b.units[kind][i]), f"{kind}[{i}] differs between two runs"
    for metric, t in a.layers.items():
        assert torch.equal(t, b.layers[metric]), f"layer {metric} differs between two runs"


def test_scores_of_another_parent_are_refused(scored):
    _, identity, paths = scored
    other = dataclasses.replace(identity, step=identity.step + 1)
    with pytest.raises(CheckpointError, match="rerun `python -m pipeline.compress importance`"):
        load_scores(paths[0], other)
    with pytest.raises(CheckpointError, match="no importance scores"):
        load_scores(paths[0].parent / "nowhere", identity)


def test_a_missing_or_unset_parent_fails_before_any_work(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        score_importance(load_run_config([*CALIBRATION, f"compress.parent={tmp_path / 'none'}",
                                          f"run_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="compress.parent is not set"):
        score_importance(load_run_config([*CALIBRATION, f"run_dir={tmp_path}"]))
    assert not (tmp_path / "compress").exists()
