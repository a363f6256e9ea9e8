"""Pruning: a student equals its parent with the same units masked (zeroed), and its checkpoint
loads strictly into the model its config builds.

The parent is a tiny fp32 model with every weight random (norms too) and activations whose mean
square is far above the norms' epsilon, so that "equal up to the epsilon inside the RMS" is tight.
Masks are written here from the tensor layouts (fused [z, x, B, C, dt] rows, QKV grouped per KV
group), independently of prune.py.
"""

import dataclasses
import json
import math

import pytest
import torch

from pipeline import checkpoint as ckpt
from pipeline.checkpoint import CheckpointTensors, save_checkpoint
from pipeline.compress.prune import (
    keep_plan,
    make_plan,
    prune_checkpoint,
    prune_tensor,
    prune_tensors,
)
from pipeline.compress.search import Candidate
from pipeline.config import load_run_config
from pipeline.distributed import distributed
from pipeline.errors import CheckpointError, ConfigError
from pipeline.model import params
from pipeline.model.build import build_model
from pipeline.model.init import global_param_names, load_full_tensors
from pipeline.model.sizes import param_counts
from tests.unit.compress_parents import logits, spread_norms
from tests.unit.compress_scores import random_scores

PARENT = [
    "device=cpu", "precision=fp32", "model.name=parent", "model.pattern=M*-M-*", "model.hidden_size=32",
    "model.ffn_hidden_size=48", "model.num_attention_heads=4", "model.num_query_groups=2", "model.kv_channels=8",
    "model.mamba_num_heads=4", "model.mamba_num_groups=2", "model.mamba_head_dim=8", "model.mamba_state_dim=8",
    "model.mamba_chunk_size=16", "model.vocab_size=256", "model.seq_length=32", "model.layernorm_epsilon=1e-10",
    "model.init_method_std=0.3", "train.seq_length=32",
]
# Layers of M*-M-*: 0 M, 1 *, 2 -, 3 M, 4 -, 5 *.


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """(run, chunk, saved original state, checkpoint step dir, reader, tokens) inside a world of one."""
    run = load_run_config(PARENT)
    with distributed(run.parallel, None, "cpu") as world:
        (chunk,) = build_model(run.model, run.parallel, run.precision, run.train.seed, world.device)
        gen = torch.Generator().manual_seed(3)
        spread_norms(chunk, gen)
        root = tmp_path_factory.mktemp("parent")
        meta = ckpt.CheckpointMeta(step=7, model=dataclasses.asdict(run.model),
                                   parallel={"tp": 1, "pp": 1, "dp": 1, "world_size": 1})
        step_dir = save_checkpoint(root / "checkpoints", 7, ckpt.model_sharded_state([chunk]), meta, "")
        tokens = torch.randint(0, run.model.vocab_size, (2, 32), generator=gen)
        state = {k: v.detach().clone() for k, v in chunk.named_parameters()}
        yield dict(run=run, chunk=chunk, state=state, step_dir=step_dir, root=root,
                   reader=CheckpointTensors(step_dir), tokens=tokens, world=world)


def _student_logits(parent, plan):
    run = dataclasses.replace(parent["run"], model=plan.student)
    (chunk,) = build_model(run.model, run.parallel, run.precision, run.train.seed, parent["world"].device)
    load_full_tensors([chunk], lambda key: prune_tensor(parent["reader"].get, plan, key))
    return logits(chunk, parent["tokens"])


def _masked_logits(parent, mask):
    """Logits of the parent with `mask(params by global name, model config)` applied, then restored."""
    chunk = parent["chunk"]
    with torch.no_grad():
        mask(global_param_names(chunk), parent["run"].model)
    try:
        return logits(chunk, parent["tokens"])
    finally:
        with torch.no_grad():
            for name, p in chunk.named_parameters():
                p.copy_(parent["state"][name])


def _assert_close(student, masked, what):
    err = ((student - masked).abs().max() / masked.abs().max()).item()
    assert err < 2e-5, f"{what}: pruned model differs from the masked parent by {err:.2e} (relative max)"


def _mamba_x_rows(m, heads, channels):
    """Rows of x in Mamba's fused in_proj ([z, x, B, C, dt]) and conv ([x, B, C]) for heads x channels."""
    P, E = m.mamba_head_dim, m.mamba_d_inner
    conv = [h * P + c for h in heads for c in channels]
    return [E + r for r in conv], conv


def _zero_mamba_x(p, layer, rows):
    in_rows, conv_rows = rows
    p[f"decoder.layers.{layer}.mixer.in_proj.weight"][in_rows] = 0
    p[f"decoder.layers.{layer}.mixer.conv1d_weight"][conv_rows] = 0
    p[f"decoder.layers.{layer}.mixer.conv1d_bias"][conv_rows] = 0


def _mask_ffn(p, m):  # layer 2 keeps neurons 0..39 except 5, 17; layer 4 drops 40..47 and 1, 2
    for layer, dropped in ((2, [5, 17, *range(42, 48)]), (4, [1, 2, *range(42, 48)])):
        p[f"decoder.layers.{layer}.mlp.linear_fc1.weight"][dropped] = 0
        p[f"decoder.layers.{layer}.mlp.linear_fc2.weight"][:, dropped] = 0


def _mask_query_heads(p, m):  # heads 0 and 3 in layer 1, heads 1 and 2 in layer 5 (one per KV group)
    d, per = m.kv_channels, m.num_attention_heads // m.num_query_groups
    for layer, head in ((1, 0), (1, 3), (5, 1), (5, 2)):
        g, i = divmod(head, per)
        rows = range(g * (per + 2) * d + i * d, g * (per + 2) * d + (i + 1) * d)
        p[f"decoder.layers.{layer}.self_attention.linear_qkv.weight"][list(rows)] = 0
        p[f"decoder.layers.{layer}.self_attention.linear_proj.weight"][:, head * d : (head + 1) * d] = 0


def _mask_layers(p, m):  # layers 3 (M), 4 (-), 5 (*): their output projections write nothing
    for key in ("3.mixer.out_proj.weight", "4.mlp.linear_fc2.weight", "5.self_attention.linear_proj.weight"):
        p[f"decoder.layers.{key}"].zero_()


def _mask_mamba_heads(p, m):  # layer 0 drops head 1 (group 0) and head 2 (group 1); layer 3 heads 0 and 3
    for layer, heads in ((0, [1, 2]), (3, [0, 3])):
        _zero_mamba_x(p, layer, _mamba_x_rows(m, heads, range(m.mamba_head_dim)))


def _mask_mamba_channels(p, m):  # layer 0 drops channels 2, 7 of every head; layer 3 channels 0, 1
    for layer, channels in ((0, [2, 7]), (3, [0, 1])):
        _zero_mamba_x(p, layer, _mamba_x_rows(m, range(m.mamba_num_heads), channels))


HIDDEN_DROPPED = [0, 9, 10, 31]
OUTPUT_PROJECTIONS = ("mixer.out_proj.weight", "self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def _mask_hidden(p, m):  # channels never written: embedding columns and every layer's output rows
    p["embedding.word_embeddings.weight"][:, HIDDEN_DROPPED] = 0
    for name, t in p.items():
        if name.endswith(OUTPUT_PROJECTIONS):
            t[HIDDEN_DROPPED] = 0


def _keep(n, dropped):
    return [i for i in range(n) if i not in dropped]


CASES = {
    "ffn neurons": (_mask_ffn, dict(ffn={2: _keep(48, [5, 17, *range(42, 48)]), 4: _keep(48, [1, 2, *range(42, 48)])})),
    "query heads": (_mask_query_heads, dict(query_heads={1: [1, 2], 5: [0, 3]})),
    "whole layers": (_mask_layers, dict(layers=[0, 1, 2])),
    "mamba heads": (_mask_mamba_heads, dict(mamba_heads={0: [0, 3], 3: [1, 2]})),
    "mamba head channels": (_mask_mamba_channels, dict(mamba_channels={0: _keep(8, [2, 7]), 3: _keep(8, [0, 1])})),
    "hidden channels": (_mask_hidden, dict(hidden=_keep(32, HIDDEN_DROPPED))),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_pruned_model_equals_parent_with_those_units_masked(parent, case):
    mask, kept = CASES[case]
    plan = make_plan(parent["run"].model, **kept)
    _assert_close(_student_logits(parent, plan), _masked_logits(parent, mask), case)


def test_masking_changes_the_parent(parent):
    """The comparisons above would pass vacuously if masking did nothing."""
    full = logits(parent["chunk"], parent["tokens"])
    for case, (mask, _) in CASES.items():
        masked = _masked_logits(parent, mask)
        assert (masked - full).abs().max() > 1e-3 * full.abs().max(), f"masking {case} did not change the logits"


@pytest.mark.parametrize("case", ["hidden channels", "mamba heads"])
def test_norm_weights_are_rescaled_for_the_rms_over_kept_channels(parent, case):
    """Without the sqrt(d/d') factor on the norm weights the student is off; with it, it matches."""
    plan = make_plan(parent["run"].model, **CASES[case][1])
    m, s = plan.parent, plan.student
    key = "decoder.final_norm.weight" if case == "hidden channels" else "decoder.layers.0.mixer.norm.weight"
    ratio = m.hidden_size / s.hidden_size if case == "hidden channels" else m.mamba_d_inner / s.mamba_d_inner
    kept = plan.hidden if case == "hidden channels" else [h * 8 + c for h in plan.mamba_heads[0] for c in range(8)]
    parent_w = parent["reader"].get(key)[list(kept)]
    torch.testing.assert_close(prune_tensor(parent["reader"].get, plan, key), parent_w * math.sqrt(ratio))

    unscaled = dict(parent)
    norms = ("layer_norm_weight", "final_norm.weight") if case == "hidden channels" else ("mixer.norm.weight",)
    unscaled["reader"] = _Unscaled(parent["reader"], math.sqrt(ratio), norms)
    masked = _masked_logits(parent, CASES[case][0])
    err = ((_student_logits(unscaled, plan) - masked).abs().max() / masked.abs().max()).item()
    assert err > 1e-3, "the rescale made no difference: this test cannot see it"


class _Unscaled:
    """Parent tensors with the norm weights pre-divided, so that pruning yields unscaled norms."""

    def __init__(self, reader, factor, norms):
        self.reader, self.factor, self.norms = reader, factor, norms

    def get(self, key):
        t = self.reader.get(key)
        return t / self.factor if key.endswith(self.norms) else t


def test_pruning_to_the_parents_own_sizes_is_the_identity(parent):
    plan = keep_plan(parent["run"].model, random_scores(parent["run"].model), Candidate())
    assert torch.equal(_student_logits(parent, plan), logits(parent["chunk"], parent["tokens"]))


def test_pruned_tensors_have_the_shapes_the_student_config_implies(parent):
    m = parent["run"].model
    plan = keep_plan(m, random_scores(m), Candidate(remove_mamba=1, hidden_size=16, ffn_hidden_size=24,
                                                    mamba_heads_per_group=1, mamba_head_dim=4, query_heads_per_group=1))
    shapes = {key: tuple(t.shape) for key, t in prune_tensors(parent["reader"].get, m, plan)}
    assert shapes == params.checkpoint_shapes(plan.student)


def test_mamba_heads_stay_in_their_groups_and_per_head_tensors_use_the_same_heads(parent):
    m = parent["run"].model
    scores = random_scores(m, seed=5)
    scores.units["mamba_heads"][0] = torch.tensor([0.9, 0.8, 0.7, 0.1])  # the best two are both in group 0
    plan = keep_plan(m, scores, Candidate(mamba_heads_per_group=1))
    assert plan.mamba_heads[0] == (0, 2), "each group must keep its own best head"
    get = parent["reader"].get
    heads = list(plan.mamba_heads[0])
    for key in ("mixer.A_log", "mixer.D", "mixer.dt_bias", "mixer.in_proj.weight.dt"):
        assert torch.equal(prune_tensor(get, plan, f"decoder.layers.0.{key}"),
                           get(f"decoder.layers.0.{key}")[heads]), key
    rows = [h * 8 + c for h in heads for c in range(8)]
    for key in ("mixer.in_proj.weight.x", "mixer.in_proj.weight.z", "mixer.conv1d.weight.x", "mixer.conv1d.bias.x"):
        assert torch.equal(prune_tensor(get, plan, f"decoder.layers.0.{key}"),
                           get(f"decoder.layers.0.{key}")[rows]), key
    for key in ("mixer.in_proj.weight.B", "mixer.in_proj.weight.C", "mixer.conv1d.weight.B", "mixer.conv1d.bias.C"):
        assert torch.equal(prune_tensor(get, plan, f"decoder.layers.0.{key}"), get(f"decoder.layers.0.{key}")), key
    assert plan.student.mamba_num_heads == 2 and plan.student.mamba_num_groups == 2


def test_pruned_checkpoint_loads_strictly_and_its_parameter_count_is_exact(parent, tmp_path):
    m = parent["run"].model
    plan = keep_plan(m, random_scores(m), Candidate(remove_mlp=1, remove_attention=1, hidden_size=24,
                                                     ffn_hidden_size=32, mamba_heads_per_group=1,
                                                     mamba_head_dim=4, query_heads_per_group=1), name="student")
    step = prune_checkpoint(parent["step_dir"], plan, tmp_path / "student")
    searchpath = f"hydra.searchpath=[file://{tmp_path / 'student'}]"
    run = load_run_config([*PARENT[:2], "train.seq_length=32", searchpath, "model=student"])
    assert run.model == plan.student
    (chunk,) = build_model(run.model, run.parallel, run.precision, run.train.seed, parent["world"].device)
    ckpt.load_model(step, [chunk])  # strict: raises on a missing or unexpected tensor
    assert torch.equal(logits(chunk, parent["tokens"]), _student_logits(parent, plan))
    assert sum(p.numel() for p in chunk.parameters()) == param_counts(plan.student)["total"]
    meta = json.loads((step / "meta.json").read_text())
    assert meta["weights_only"] and meta["pruned_from"]["step"] == 7
    record = json.loads((tmp_path / "student" / "keep_plan.json").read_text())
    assert record["hidden"] == list(plan.hidden) and record["layers"] == list(plan.layers)
    assert record["mamba_heads"] == {str(i): list(h) for i, h in plan.mamba_heads.items()}


def test_bad_requests_fail_before_writing(parent, tmp_path):
    m = parent["run"].model
    plan = make_plan(m)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="does not exist"):
        prune_checkpoint(tmp_path / "missing", plan, out)
    other = make_plan(dataclasses.replace(m, ffn_hidden_size=64))
    with pytest.raises(CheckpointError, match="ffn_hidden_size"):
        prune_checkpoint(parent["step_dir"], other, out)
    with pytest.raises(ConfigError, match="same number in every group"):
        make_plan(m, mamba_heads={0: [0, 1, 2]})
    with pytest.raises(ConfigError, match="cannot keep 9"):
        keep_plan(m, random_scores(m), Candidate(mamba_head_dim=9))
    assert not out.exists()


def test_incomplete_parent_checkpoints_are_refused(parent, tmp_path):
    import shutil

    broken = tmp_path / "broken" / "step_0000007"
    shutil.copytree(parent["step_dir"], broken)
    meta = json.loads((broken / "meta.json").read_text())
    meta["model"]["hidden_size"] = 40  # the stored tensors no longer cover the model the meta describes
    (broken / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="incomplete or not of model"):
        prune_checkpoint(broken, make_plan(dataclasses.replace(parent["run"].model, hidden_size=40)), tmp_path / "o")
    (broken / ckpt.COMPLETE).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        prune_checkpoint(broken, make_plan(parent["run"].model), tmp_path / "o")
    assert not (tmp_path / "o").exists()
