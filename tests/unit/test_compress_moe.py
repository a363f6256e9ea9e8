"""Compression of a hybrid MoE parent: expert importance against a hand computation, and pruning of
routed experts, expert and shared-expert neurons checked against the parent with those units removed
or masked.

The parent is a small fp32 `ME*E` model with sigmoid routing, an expert bias, a top-k scaling factor
and a shared expert (the Nemotron 3 router), random weights and norms.
"""

import dataclasses

import pytest
import torch

from pipeline import checkpoint as ckpt
from pipeline.checkpoint import CheckpointTensors, save_checkpoint
from pipeline.compress.importance import score_model
from pipeline.config import load_run_config
from pipeline.distributed import distributed
from pipeline.model.build import build_model
from pipeline.model.init import global_param_names
from pipeline.training.batches import ModelInputs

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


def _logits(chunk, tokens):
    chunk.eval()
    with torch.no_grad():
        return chunk(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None).float()


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """(run, chunk, saved original state, checkpoint step dir, reader, tokens, world) in a world of one."""
    run = load_run_config(PARENT)
    with distributed(run.parallel, None, "cpu") as world:
        (chunk,) = build_model(run.model, run.parallel, run.precision, run.train.seed, world.device)
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, p in chunk.named_parameters():
                if name.endswith(("norm.weight", "layer_norm_weight", "mixer.D")):
                    p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
                elif name.endswith("mixer.in_proj.weight"):
                    p.mul_(6)
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
        _logits(chunk, tokens)
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
