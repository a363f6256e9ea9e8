"""The `E` layers' router on the portable backend against hand computations: the sequence aux loss
(value and its gradient into the router weight), the sigmoid top-k routing with expert bias, and the
expert-bias update the trainer's finalize_model_grads applies after each step."""

import pytest
import torch
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from pipeline.config import load_run_config
from pipeline.distributed import distributed
from pipeline.model.build import build_model

S, B = 16, 3  # tokens per sequence, sequences


@pytest.fixture(scope="module")
def model_and_config():
    run = load_run_config(["device=cpu", "precision=fp32", "model=tiny_moe", "model.pattern=ME"])
    with distributed(run.parallel, None, run.device) as world:
        (chunk,) = build_model(run.model, run.parallel, run.precision, run.train.seed, world.device)
        yield chunk, run.model.moe


@pytest.fixture
def router_and_config(model_and_config):
    chunk, moe = model_and_config
    return chunk.decoder.layers[1].mlp.router, moe


def hand_seq_aux_loss(x_SBH: torch.Tensor, weight_EH: torch.Tensor, top_k: int) -> torch.Tensor:
    """Mean over sequences of E * sum_i f_i * P_i (Switch Transformer, per sequence): P_i the mean
    normalised sigmoid score of expert i, f_i the fraction of the sequence's top-k picks (on those
    scores, without the expert bias) that went to expert i."""
    num_experts = weight_EH.shape[0]
    losses = []
    for b in range(x_SBH.shape[1]):
        scores_SE = torch.sigmoid(x_SBH[:, b] @ weight_EH.t())
        scores_SE = scores_SE / scores_SE.sum(-1, keepdim=True)
        picks_SE = torch.zeros_like(scores_SE).scatter(1, scores_SE.topk(top_k, dim=-1).indices, 1.0)
        f_E = picks_SE.sum(0) / (x_SBH.shape[0] * top_k)
        p_E = scores_SE.mean(0)
        losses.append(num_experts * (f_E * p_E).sum())
    return torch.stack(losses).mean()


def test_seq_aux_loss_value_and_gradient_match_hand_computation(router_and_config):
    router, moe = router_and_config
    router.train()
    router.weight.grad = None
    x_SBH = torch.randn(S, B, router.weight.shape[1], generator=torch.Generator().manual_seed(0))
    tracker = get_moe_metrics_tracker()
    tracker.clear()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    probs, _ = router(x_SBH)
    # The aux loss reaches the weights only through the gradient MoEAuxLossAutoScaler attaches to probs.
    (probs * 0).sum().backward()
    recorded = tracker.metrics["seq_load_balancing_loss"].values.sum()

    weight = router.weight.detach().clone().requires_grad_(True)
    expected = hand_seq_aux_loss(x_SBH, weight, moe.top_k)
    (moe.aux_loss_coeff * expected).backward()

    assert recorded.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(router.weight.grad, weight.grad, rtol=1e-4, atol=1e-9)
    assert weight.grad.abs().max() > 0


def test_sigmoid_topk_routing_with_expert_bias_and_scaling(router_and_config):
    router, moe = router_and_config
    router.eval()
    bias = torch.linspace(-0.3, 0.3, moe.num_experts)
    router.expert_bias.copy_(bias)
    x_SBH = torch.randn(S, B, router.weight.shape[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        probs_TE, routing_map_TE = router(x_SBH)
        scores_TE = torch.sigmoid(x_SBH.reshape(-1, x_SBH.shape[-1]) @ router.weight.t())
    # The bias picks the experts; the weights are the unbiased scores of the picked ones,
    # renormalised over the top-k and multiplied by the scaling factor.
    picked = (scores_TE + bias).topk(moe.top_k, dim=-1).indices
    expected_map = torch.zeros_like(routing_map_TE).scatter(1, picked, True)
    chosen = scores_TE.gather(1, picked)
    expected = torch.zeros_like(probs_TE).scatter(1, picked, moe.scaling_factor * chosen / chosen.sum(-1, keepdim=True))
    router.expert_bias.zero_()
    assert torch.equal(routing_map_TE, expected_map)
    assert torch.allclose(probs_TE, expected, rtol=1e-5)


def test_expert_bias_moves_each_expert_by_the_rate_toward_the_mean_load(model_and_config):
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    chunk, moe = model_and_config
    router = chunk.decoder.layers[1].mlp.router
    router.train()
    router.expert_bias.zero_()
    router.local_tokens_per_expert.zero_()
    x_SBH = torch.randn(S, B, router.weight.shape[1], generator=torch.Generator().manual_seed(2))
    _, routing_map_TE = router(x_SBH)  # grad mode on: the router counts its tokens per expert
    counts_E = routing_map_TE.sum(0).float()
    _update_router_expert_bias([chunk], chunk.config)  # what finalize_model_grads runs after the backward
    expected_E = moe.bias_update_rate * torch.sign(counts_E.mean() - counts_E)
    assert torch.equal(router.expert_bias, expected_E)
    assert expected_E.abs().sum() > 0
