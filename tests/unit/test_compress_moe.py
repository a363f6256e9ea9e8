"""Compression of a hybrid MoE parent: expert importance against a hand computation, and pruning of
routed experts, expert and shared-expert neurons checked against the parent with those units removed
or masked.

The parent is a small fp32 `ME*E` model with sigmoid routing, an expert bias, a top-k scaling factor
and a shared expert (the Nemotron 3 router), random weights and norms.
"""

import dataclasses
import re

import pytest
import torch

from pipeline import checkpoint as ckpt
from pipeline.checkpoint import CheckpointTensors, save_checkpoint
from pipeline.compress.config import CompressConfig
from pipeline.compress.importance import score_model
from pipeline.compress.prune import EXPERT_BIAS, keep_plan, load_pruned, make_plan, prune_checkpoint, prune_tensors
from pipeline.compress.search import Candidate, check_search_request, memory_bytes, search_candidates
from pipeline.config import load_run_config
from pipeline.distributed import ParallelConfig, distributed
from pipeline.errors import ConfigError
from pipeline.model import params
from pipeline.model.build import build_model
from pipeline.model.init import global_param_names
from pipeline.model.precision import PrecisionConfig
from pipeline.model.sizes import active_param_count, param_counts
from pipeline.training.batches import ModelInputs
from tests.unit.compress_parents import logits, spread_norms
from tests.unit.compress_scores import random_scores

MOE_LAYERS = (1, 3)
PARENT = [
    "device=cpu", "precision=fp32", "model.name=moe_parent", "model.pattern=ME*E", "model.hidden_size=32",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.kv_channels=8", "model.mamba_num_heads=4",
    "model.mamba_num_groups=2", "model.mamba_head_dim=8", "model.mamba_state_dim=8", "model.mamba_chunk_size=16",
    "model.vocab_size=256", "model.seq_length=32", "model.layernorm_epsilon=1e-10", "model.init_method_std=0.3",
    "model.moe.num_experts=6", "model.moe.top_k=2", "model.moe.ffn_hidden_size=16",
    "model.moe.shared_ffn_hidden_size=24", "model.moe.score_function=sigmoid", "model.moe.expert_bias=true",
    "model.moe.scaling_factor=2.5", "model.moe.aux_loss=seq_aux_loss", "model.moe.aux_loss_coeff=0.01",
    "train.seq_length=32",
]


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """(run, chunk, saved original state, checkpoint step dir, reader, tokens, world) in a world of one."""
    run = load_run_config(PARENT)
    with distributed(run.parallel, None, "cpu") as world:
        (chunk,) = build_model(run.model, run.parallel, run.precision, run.train.seed, world.device)
        gen = torch.Generator().manual_seed(5)
        spread_norms(chunk, gen)
        with torch.no_grad():
            for i in MOE_LAYERS:  # a trained-looking bias: it changes which experts win
                chunk.decoder.layers[i].mlp.router.expert_bias.copy_(0.2 * torch.randn(6, generator=gen))
        root = tmp_path_factory.mktemp("moe_parent")
        meta = ckpt.CheckpointMeta(step=3, model=dataclasses.asdict(run.model),
                                   parallel={"tp": 1, "pp": 1, "dp": 1, "world_size": 1})
        step_dir = save_checkpoint(root / "checkpoints", 3, ckpt.model_sharded_state([chunk]), meta, "")
        tokens = torch.randint(0, run.model.vocab_size, (2, 32), generator=gen)
        state = {k: v.detach().clone() for k, v in chunk.state_dict().items() if torch.is_tensor(v)}
        yield dict(run=run, chunk=chunk, state=state, step_dir=step_dir, root=root,
                   reader=CheckpointTensors(step_dir), tokens=tokens, world=world)


def _inputs(tokens):
    labels = torch.roll(tokens, -1, 1)
    return ModelInputs(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), labels,
                       torch.ones_like(tokens, dtype=torch.float), None)


def _routing_by_hand(x_TH, router_w, bias, moe):
    """Nemotron 3 routing written out: sigmoid scores, top-k by score + bias, the chosen scores
    renormalised and scaled. Returns the weight of every (token, expert), 0 where not routed."""
    scores = torch.sigmoid(x_TH.double() @ router_w.double().t())
    chosen = torch.topk(scores + bias.double(), moe.top_k, dim=-1).indices
    picked = scores.gather(1, chosen)
    weights = torch.zeros_like(scores)
    weights.scatter_(1, chosen, picked / picked.sum(-1, keepdim=True) * moe.scaling_factor)
    return weights


def test_expert_importance_equals_a_hand_computation(parent):
    """Frequency, output norm, expert and neuron scores from the routing and expert weights directly."""
    chunk, model, tokens = parent["chunk"], parent["run"].model, parent["tokens"]
    normed = {}
    hooks = [chunk.decoder.layers[i].pre_mlp_layernorm.register_forward_hook(
        lambda m, a, out, i=i: normed.__setitem__(i, out.detach().reshape(-1, out.shape[-1])))
        for i in MOE_LAYERS]
    try:
        logits(chunk, tokens)
    finally:
        for h in hooks:
            h.remove()
    _, units, _ = score_model([chunk], model, [_inputs(tokens)], 0, tokens.shape[1])
    p = global_param_names(chunk)
    moe = model.moe
    for i in MOE_LAYERS:
        x = normed[i].double()
        weights = _routing_by_hand(x, p[f"decoder.layers.{i}.mlp.router.weight"],
                                   chunk.decoder.layers[i].mlp.router.expert_bias, moe)
        T = x.shape[0]
        freq, mean_norm, expected, neurons = [], [], [], []
        for e in range(moe.num_experts):
            w1 = p[f"decoder.layers.{i}.mlp.experts.linear_fc1.weight{e}"].double()
            w2 = p[f"decoder.layers.{i}.mlp.experts.linear_fc2.weight{e}"].double()
            routed = weights[:, e] > 0
            a = torch.relu(x[routed] @ w1.t()).square() * weights[routed, e, None]
            norms = (a @ w2.t()).norm(dim=-1)
            freq.append(routed.sum().double() / T)
            mean_norm.append(norms.mean() if routed.any() else torch.zeros((), dtype=torch.double))
            expected.append(norms.sum() / T)
            neurons.append(a.abs().sum(0) / T)
        got = {k: units[k][i].double() for k in ("expert_frequency", "expert_output_norm", "experts", "expert_ffn")}
        assert 0 < min(freq) and max(freq) < 1, "every expert should be routed to some, not all, tokens"
        torch.testing.assert_close(got["expert_frequency"], torch.stack(freq), rtol=0, atol=1e-7)
        torch.testing.assert_close(got["expert_output_norm"], torch.stack(mean_norm), rtol=1e-5, atol=0)
        torch.testing.assert_close(got["experts"], torch.stack(expected), rtol=1e-5, atol=0)
        torch.testing.assert_close(got["expert_ffn"], torch.stack(neurons), rtol=1e-5, atol=1e-9)
        # The shared expert's neurons are scored like a dense FFN's: sqrt(sum_b (mean_s |A|)^2).
        s1 = p[f"decoder.layers.{i}.mlp.shared_experts.linear_fc1.weight"].double()
        a = torch.relu(x @ s1.t()).square().abs().reshape(tokens.shape[1], tokens.shape[0], -1)
        torch.testing.assert_close(units["shared_ffn"][i].double(), a.mean(0).square().sum(0).sqrt(),
                                   rtol=1e-5, atol=0)


def _student(parent, plan):
    run = dataclasses.replace(parent["run"], model=plan.student)
    (chunk,) = build_model(run.model, run.parallel, run.precision, run.train.seed, parent["world"].device)
    load_pruned([chunk], parent["reader"].get, plan)
    return chunk


def _masked_logits(parent, mask):
    """Logits of the parent with `mask(params and buffers by global name)` applied, then restored."""
    chunk = parent["chunk"]
    tensors = global_param_names(chunk)
    tensors.update({f"decoder.layers.{i}.{EXPERT_BIAS}": chunk.decoder.layers[i].mlp.router.expert_bias
                    for i in MOE_LAYERS})
    with torch.no_grad():
        mask(tensors)
    try:
        return logits(chunk, parent["tokens"])
    finally:
        chunk.load_state_dict(parent["state"], strict=False)


def _keep(n, dropped):
    return [i for i in range(n) if i not in dropped]


DROPPED_EXPERTS = {1: [1, 4], 3: [0, 3]}
# (layer, expert): dropped neurons, two in every expert (every expert keeps the same width)
DROPPED_NEURONS = {(layer, e): [(e + layer) % 8, (e + layer) % 8 + 8] for layer in MOE_LAYERS for e in range(6)}
SHARED_DROPPED = {1: [0, 5, 23], 3: [2, 3, 20]}
HIDDEN_DROPPED = [0, 9, 10, 31]


def _route_around_dropped_experts(p):
    """The parent never picks the dropped experts (their bias is far below the others')."""
    for layer, experts in DROPPED_EXPERTS.items():
        p[f"decoder.layers.{layer}.{EXPERT_BIAS}"][experts] = -1e4


def _mask_expert_neurons(p):
    for (layer, e), neurons in DROPPED_NEURONS.items():
        p[f"decoder.layers.{layer}.mlp.experts.linear_fc1.weight{e}"][neurons] = 0


def _mask_shared_neurons(p):
    for layer, neurons in SHARED_DROPPED.items():
        p[f"decoder.layers.{layer}.mlp.shared_experts.linear_fc1.weight"][neurons] = 0


def _mask_moe_layer(p):  # layer 1 writes nothing: every expert's and the shared expert's fc2 zero
    for name, t in p.items():
        if name.startswith("decoder.layers.1.mlp.") and "linear_fc2" in name:
            t.zero_()


def _mask_hidden(p):  # channels never written: embedding columns and every layer's output rows
    p["embedding.word_embeddings.weight"][:, HIDDEN_DROPPED] = 0
    for name, t in p.items():
        if re.search(r"(out_proj|linear_proj|linear_fc2)\.weight\d*$", name):
            t[HIDDEN_DROPPED] = 0


CASES = {
    "routed experts": (_route_around_dropped_experts,
                       dict(experts={i: _keep(6, d) for i, d in DROPPED_EXPERTS.items()})),
    "expert neurons": (_mask_expert_neurons, dict(expert_ffn={
        i: {e: _keep(16, n) for (layer, e), n in DROPPED_NEURONS.items() if layer == i} for i in MOE_LAYERS})),
    "shared-expert neurons": (_mask_shared_neurons,
                              dict(shared_ffn={i: _keep(24, n) for i, n in SHARED_DROPPED.items()})),
    "a whole MoE layer": (_mask_moe_layer, dict(layers=[0, 2, 3])),
    "hidden channels": (_mask_hidden, dict(hidden=_keep(32, HIDDEN_DROPPED))),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_pruned_moe_model_equals_the_parent_without_those_units(parent, case):
    """Experts: the parent restricted to the kept experts (it never routes to the others) equals the
    student; neurons, layers, hidden channels: the parent with them masked equals the student."""
    mask, kept = CASES[case]
    plan = make_plan(parent["run"].model, **kept)
    student = logits(_student(parent, plan), parent["tokens"])
    masked = _masked_logits(parent, mask)
    full = logits(parent["chunk"], parent["tokens"])
    assert (masked - full).abs().max() > 1e-3 * full.abs().max(), f"masking {case} did not change the parent"
    err = ((student - masked).abs().max() / masked.abs().max()).item()
    assert err < 2e-5, f"{case}: pruned model differs from the parent without those units by {err:.2e}"


def test_pruned_checkpoint_keeps_the_best_experts_with_their_router_rows_and_bias(parent, tmp_path):
    m = parent["run"].model
    scores = random_scores(m, seed=2)
    scores.units["experts"][3] = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2, 0.7])
    candidate = Candidate(hidden_size=24, num_experts=3, moe_ffn_hidden_size=8, shared_ffn_hidden_size=12)
    plan = keep_plan(m, scores, candidate, name="student")
    assert plan.experts[3] == (1, 3, 5)
    assert (plan.student.moe.num_experts, plan.student.moe.ffn_hidden_size,
            plan.student.moe.shared_ffn_hidden_size) == (3, 8, 12)
    step = prune_checkpoint(parent["step_dir"], plan, tmp_path / "student")
    stored = CheckpointTensors(step)
    get = parent["reader"].get
    bias = stored.get(f"decoder.layers.3.{EXPERT_BIAS}")
    assert torch.equal(bias, get(f"decoder.layers.3.{EXPERT_BIAS}")[[1, 3, 5]])
    router = stored.get("decoder.layers.3.mlp.router.weight")
    assert torch.equal(router, get("decoder.layers.3.mlp.router.weight")[[1, 3, 5]][:, list(plan.hidden)])
    fc1 = stored.get("decoder.layers.3.mlp.experts.experts.linear_fc1.weight")
    for k, e in enumerate(plan.experts[3]):  # each expert its own best neurons
        neurons = scores.units["expert_ffn"][3][e]
        assert plan.expert_ffn[3][k] == tuple(sorted(neurons.argsort(descending=True)[:8].tolist()))
        parent_fc1 = get("decoder.layers.3.mlp.experts.experts.linear_fc1.weight")[e]
        assert torch.equal(fc1[k], parent_fc1[list(plan.expert_ffn[3][k])][:, list(plan.hidden)])
    searchpath = f"hydra.searchpath=[file://{tmp_path / 'student'}]"
    run = load_run_config(["device=cpu", "precision=fp32", "train.seq_length=32", searchpath, "model=student"])
    assert run.model == plan.student
    (chunk,) = build_model(run.model, run.parallel, run.precision, run.train.seed, parent["world"].device)
    ckpt.load_model(step, [chunk])  # strict
    assert torch.equal(logits(chunk, parent["tokens"]), logits(_student(parent, plan), parent["tokens"]))
    assert sum(p.numel() for p in chunk.parameters()) == param_counts(plan.student)["total"]
    assert dict(shape for shape in params.checkpoint_shapes(plan.student).items()) == {
        k: tuple(t.shape) for k, t in prune_tensors(get, m, plan)}


def test_fewer_experts_than_top_k_are_refused_in_one_line(parent):
    m = parent["run"].model
    with pytest.raises(ConfigError, match=r"cannot keep 1 of 6 routed experts: model.moe.top_k=2 .*num_experts"):
        make_plan(m, experts={1: [0], 3: [2]})
    with pytest.raises(ConfigError, match=r"compress.num_experts has 1: model.moe.top_k=2"):
        check_search_request(m, CompressConfig(target_params=1e9, num_experts=[1]), ParallelConfig(),
                             PrecisionConfig())


def _search(parent, **cfg):
    m = parent["run"].model
    return search_candidates(m, random_scores(m), CompressConfig(top_k=50, **cfg), ParallelConfig(),
                             PrecisionConfig(), 32)


def test_active_parameter_budget_counts_the_routed_experts_a_token_uses(parent):
    """Dropping experts lowers the total parameters by whole experts but the active ones only by
    their router rows: an active budget below that needs the MoE layer removed or narrower experts."""
    m = parent["run"].model
    parent_only = dict(hidden_sizes=[32], mamba_heads_per_group=[2], mamba_head_dims=[8], query_heads_per_group=[2],
                       moe_ffn_hidden_sizes=[16], shared_ffn_hidden_sizes=[24], num_experts=[6, 4, 2])
    total, active = param_counts(m)["total"], active_param_count(m)
    by_total = _search(parent, target_params=total - 1, max_removed_fraction=0.0, **parent_only)
    assert {f.candidate.num_experts for f in by_total} == {4, 2}
    router_rows_of_4_experts = 2 * 4 * m.hidden_size  # two MoE layers, 6 -> 2 experts
    target = active - router_rows_of_4_experts - 1
    with pytest.raises(ConfigError, match="target_active_params"):
        _search(parent, target_active_params=target, max_removed_fraction=0.0, **parent_only)
    by_active = _search(parent, target_active_params=target, max_removed_fraction=0.5, **parent_only)
    assert by_active and all(f.candidate.remove_moe == 1 for f in by_active)
    assert all(f.student.pattern.count("E") == 1 for f in by_active)
    narrower = _search(parent, target_active_params=target, max_removed_fraction=0.0,
                       **{**parent_only, "moe_ffn_hidden_sizes": [16, 8]})
    assert narrower and all(f.candidate.moe_ffn_hidden_size == 8 for f in narrower)
    for f in by_total + by_active + narrower:  # the search's linear sums equal counts of the student
        assert f.params == param_counts(f.student)["total"] and f.active_params == active_param_count(f.student)
        assert f.memory == memory_bytes(f.student, 8192, 1)


def test_a_model_of_another_depth_gets_a_fresh_moe_metrics_tracker():
    """`compress rank` distils candidates of different depths in one process: megatron's tracker
    must not keep the first one's per-layer sums (it indexed past them: IndexError)."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    from pipeline.training.expert_load import _tracker_for

    get_moe_metrics_tracker().record("seq_load_balancing_loss", torch.ones(()), layer_number=5, num_layers=5)
    _tracker_for(5)
    assert get_moe_metrics_tracker().metrics["seq_load_balancing_loss"].values[4] == 1, "same depth: kept"
    _tracker_for(7)
    get_moe_metrics_tracker().record("seq_load_balancing_loss", torch.ones(()), layer_number=7, num_layers=7)
    assert get_moe_metrics_tracker().metrics["seq_load_balancing_loss"].values.tolist() == [0] * 6 + [1]


def test_modelopt_parent_with_sequential_experts_loads_the_same_checkpoint(parent):
    """bench/compress_modelopt.py builds an MoE parent with SequentialMLP experts (modelopt's
    default); it loads the grouped experts' checkpoint and computes the same logits."""
    from bench.compress_modelopt import sequential_experts_spec

    run = parent["run"]
    spec = sequential_experts_spec(run.model, "portable")
    (chunk,) = build_model(run.model, run.parallel, run.precision, run.train.seed, parent["world"].device, spec=spec)
    assert type(chunk.decoder.layers[1].mlp.experts).__name__ == "SequentialMLP"
    ckpt.load_model(parent["step_dir"], [chunk])
    torch.testing.assert_close(logits(chunk, parent["tokens"]), logits(parent["chunk"], parent["tokens"]),
                               rtol=1e-5, atol=1e-5)


def test_modelopt_export_config_names_the_moe_widths(parent):
    from bench.compress_modelopt import architecture, export_config

    m = parent["run"].model
    plan = keep_plan(m, random_scores(m), Candidate(num_experts=4, moe_ffn_hidden_size=8, remove_moe=1))
    config, notes = export_config(m, plan.student)
    assert config == {"num_moe_experts": 4, "moe_ffn_hidden_size": 8, "num_layers": 3}, config
    assert any("experts" in note for note in notes), notes
    assert architecture(plan.student)["moe_shared_expert_intermediate_size"] == 24
