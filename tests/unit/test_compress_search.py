"""Search: candidates stay inside their budget, remove the least important layers of each type,
are valid models whose analytic size is the real one, and bad requests fail with one line."""

import dataclasses
import json

import pytest

from pipeline import checkpoint as ckpt
from pipeline.checkpoint import save_checkpoint
from pipeline.compress.prune import keep_plan, prune_checkpoint
from pipeline.compress.scores import ParentIdentity, save_scores
from pipeline.compress.search import Candidate, check_search_request, load_candidates, search, search_candidates
from pipeline.config import load_run_config
from pipeline.distributed import distributed
from pipeline.errors import ConfigError
from pipeline.model.build import build_model
from tests.unit.compress_scores import random_scores

MODEL = [
    "model.name=parent", "model.pattern=M-M*-M-M*-", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.kv_channels=16", "model.mamba_num_heads=16",
    "model.mamba_num_groups=2", "model.mamba_head_dim=8", "model.mamba_state_dim=16", "model.vocab_size=512",
    "model.seq_length=64", "train.seq_length=64", "device=cpu", "precision=fp32",
    "compress.max_removed_fraction=0.5", "compress.top_k=4", "compress.memory_context=64",
]
# Layers of M-M*-M-M*-: 0 M, 1 -, 2 M, 3 *, 4 -, 5 M, 6 -, 7 M, 8 *, 9 -.
LAYER_IMPORTANCE = [5.0, 4.0, 9.0, 8.0, 0.5, 0.1, 7.0, 3.0, 6.0, 2.0]  # least: M 5, then M 7; - 4, then - 9; * 8


def _scores(model, identity=None):
    return random_scores(model, layer_scores=LAYER_IMPORTANCE, identity=identity)


def _run(*overrides):
    return load_run_config([*MODEL, *overrides])


def _search(run):
    return search_candidates(run.model, _scores(run.model), run.compress, run.parallel, run.precision, 64)


def _memory(m, s, b):
    """The inference memory formula, written out here: weights + KV cache + Mamba state, 2 bytes each."""
    counts = m.parsed_pattern().counts()
    params = sum(p.numel() for p in _built(m).parameters())
    kv = 2 * b * s * m.num_query_groups * m.kv_channels * counts["attention"]
    state = counts["mamba"] * b * (
        (m.mamba_num_heads * m.mamba_head_dim + 2 * m.mamba_num_groups * m.mamba_state_dim) * (m.mamba_conv_kernel - 1)
        + m.mamba_num_heads * m.mamba_head_dim * m.mamba_state_dim
    )
    return 2 * (params + kv + state), params


def _built(model):
    run = _run()
    run = dataclasses.replace(run, model=model)
    with distributed(run.parallel, None, "cpu") as world:
        (chunk,) = build_model(run.model, run.parallel, run.precision, run.train.seed, world.device)
    return chunk


def test_every_candidate_is_inside_its_budget_and_its_size_is_the_real_one():
    parent = _run().model
    full = sum(p.numel() for p in _built(parent).parameters())
    run = _run(f"compress.target_params={int(full * 0.6)}", "compress.target_memory_gib=0.0015")
    found = _search(run)
    assert len(found) == 4
    for f in found:
        memory, params = _memory(f.student, 64, 1)
        assert f.params == params, f"{f.candidate}: analytic {f.params} != built {params}"
        assert params <= full * 0.6, f"{f.candidate} has {params} > target"
        assert f.memory["total"] == memory and memory <= 0.0015 * 2**30, f.candidate


def test_layer_removals_take_the_least_important_layers_of_each_type():
    run = _run("compress.target_params=1e9")
    parent = run.model
    found = search_candidates(parent, _scores(parent), dataclasses.replace(run.compress, top_k=10**6),
                              run.parallel, run.precision, 64)
    layers = parent.parsed_pattern().layers
    expected_order = {"M": [5, 7, 0, 2], "-": [4, 9, 1, 6], "*": [8, 3]}
    field = {"M": "remove_mamba", "-": "remove_mlp", "*": "remove_attention"}
    seen = set()
    for f in found:
        gone = {i for s, order in expected_order.items() for i in order[: getattr(f.candidate, field[s])]}
        assert f.student.pattern == "".join(s for i, s in enumerate(layers) if i not in gone), f.candidate
        seen.add(tuple(getattr(f.candidate, v) for v in field.values()))
    assert (2, 2, 1) in seen and (0, 0, 0) in seen, "the search must try 0 up to half of each type"


def test_search_ranks_by_importance_kept_and_tries_every_kind_of_cut():
    run = _run("compress.target_params=1e9")
    found = search_candidates(run.model, _scores(run.model), dataclasses.replace(run.compress, top_k=10**6),
                              run.parallel, run.precision, 64)
    assert found[0].candidate == Candidate(), "with a loose budget the parent itself keeps the most"
    kept = [f.kept_importance for f in found]
    assert kept == sorted(kept, reverse=True)
    for name in ("hidden_size", "ffn_hidden_size", "mamba_heads_per_group", "mamba_head_dim", "query_heads_per_group"):
        assert len({getattr(f.candidate, name) for f in found}) > 1, f"the search never cut {name}"


def test_candidates_are_valid_at_tp2_and_with_fp8():
    run = _run("parallel.tp=2", "precision=fp8_tensorwise", "compress.target_params=1e9")
    found = search_candidates(run.model, _scores(run.model), dataclasses.replace(run.compress, top_k=10**6),
                              run.parallel, run.precision, 64)
    assert found
    for f in found:
        s = f.student
        assert s.mamba_num_heads % 2 == 0 and s.num_attention_heads % 2 == 0 and s.ffn_hidden_size % 32 == 0, s
        assert s.hidden_size % 16 == 0 and s.mamba_in_proj_width % 16 == 0 and s.mamba_d_inner % 16 == 0, s


@pytest.mark.parametrize("overrides, message", [
    (["compress.target_params=1000"], "no candidate fits compress.target_params=1000"),
    ([], "no budget: set compress.target_params"),
    (["compress.target_params=1e9", "compress.query_heads_per_group=[2,3]"],
     "compress.query_heads_per_group has 3: exceeds the parent's 2"),
    (["compress.target_params=1e9", "parallel.tp=2", "compress.ffn_hidden_sizes=[96,95]"],
     "compress.ffn_hidden_sizes has 95: ffn_hidden_size=95 is not a multiple of 2 .parallel.tp=2"),
    (["compress.target_params=1e9", "precision=fp8_tensorwise", "compress.hidden_sizes=[56]"],
     "compress.hidden_sizes has 56: hidden_size=56 is not a multiple of 16 .FP8"),
    (["compress.target_params=1e9", "precision=fp8_tensorwise", "compress.mamba_heads_per_group=[7]"],
     "compress.mamba_heads_per_group has 7: Mamba in_proj width .* is not a multiple of 16"),
])
def test_bad_requests_fail_before_any_work_with_one_line(overrides, message):
    run = _run(*overrides)
    with pytest.raises(ConfigError, match=message) as error:
        check_search_request(run.model, run.compress, run.parallel, run.precision)
    assert "\n" not in str(error.value)


def test_search_step_prints_the_table_and_its_top_candidate_prunes_to_a_loadable_student(tmp_path, capsys):
    parent_run = _run()
    with distributed(parent_run.parallel, None, "cpu") as world:
        (chunk,) = build_model(parent_run.model, parent_run.parallel, parent_run.precision, parent_run.train.seed,
                               world.device)
        meta = ckpt.CheckpointMeta(step=2, model=dataclasses.asdict(parent_run.model))
        step = save_checkpoint(tmp_path / "parent" / "checkpoints", 2, ckpt.model_sharded_state([chunk]),
                                    meta, "")
    identity = ParentIdentity(str(step.resolve()), 2, meta.model)
    run = _run(f"compress.parent={tmp_path / 'parent'}", f"run_dir={tmp_path / 'run'}", "compress.target_params=2e5")
    save_scores(_scores(run.model, identity), tmp_path / "run" / "compress" / "scores")
    found = search(run)
    table = capsys.readouterr().out
    assert "memory = weights params*2 B + KV cache 2*b*s*n_kv*d_kv*n_attn*2 B" in table
    for f in found:
        assert f.student.pattern in table
    assert [f.to_json() for f in load_candidates(tmp_path / "run" / "compress" / "candidates.json")] == [
        json.loads(json.dumps(f.to_json())) for f in found]

    best = found[0]
    plan = keep_plan(run.model, _scores(run.model, identity), best.candidate, name=best.student.name)
    assert plan.student == best.student
    out = prune_checkpoint(tmp_path / "parent", plan, tmp_path / "student")
    student_run = dataclasses.replace(run, model=best.student)
    with distributed(student_run.parallel, None, "cpu") as world:
        (chunk,) = build_model(student_run.model, student_run.parallel, student_run.precision,
                               student_run.train.seed, world.device)
        ckpt.load_model(out, [chunk])
    assert sum(p.numel() for p in chunk.parameters()) == best.params <= 2e5
