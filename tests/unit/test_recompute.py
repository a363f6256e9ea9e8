"""Activation recompute (train.recompute) trades memory for compute and nothing else: every choice gives
the loss and gradients of none on the portable CPU backend; describe's activation estimate falls from
none to selective to full; impossible choices are refused in one line."""

import pytest
import torch

from pipeline.config import load_run_config
from pipeline.distributed import distributed
from pipeline.model.build import build_model
from pipeline.model.sizes import memory_estimate
from pipeline.training.batches import to_model_inputs
from tests.unit.config_errors import assert_refused_in_one_line

EOD = 0
CHOICES = {
    "tiny": {
        "selective": ["train.recompute=selective"],  # core_attn and mlp
        "full_uniform_2": ["train.recompute=full", "train.recompute_num_layers=2"],
        "full_block_3": ["train.recompute=full", "train.recompute_method=block", "train.recompute_num_layers=3"],
    },
    "tiny_moe": {
        "selective": ["train.recompute=selective"],  # core_attn, moe_act, layernorm, shared_experts
        "selective_moe": ["train.recompute=selective", "train.recompute_modules=[moe]"],
        "full_uniform_1": ["train.recompute=full"],
    },
}
CASES = [(model, name) for model, choices in CHOICES.items() for name in choices]


def _loss_and_grads(overrides: list[str]) -> tuple[float, dict[str, torch.Tensor], int]:
    """One training forward and backward of a packed micro-batch (three documents per sequence): the
    loss, the gradients and the bytes autograd saved for the backward during the forward."""
    run = load_run_config(["precision=fp32", *overrides])
    with distributed(run.parallel, None, "cpu") as world:
        (model,) = build_model(run.model, run.parallel, run.precision, run.train.seed, world.device,
                               recompute=run.train)
        model.train()
        tokens = torch.randint(1, run.model.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
        tokens[:, [30, 61]] = EOD
        batch = {"tokens": tokens, "labels": tokens.roll(-1, 1), "loss_mask": torch.ones(2, 96)}
        inputs = to_model_inputs(batch, EOD, True, world.device)
        saved = []

        def pack(tensor):
            saved.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(inputs.tokens, inputs.position_ids, None, labels=inputs.labels,
                         packed_seq_params=inputs.packed_seq_params).mean()
        forward_saved = sum(saved)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return loss.item(), grads, forward_saved


@pytest.fixture(scope="module")
def references():
    return {model: _loss_and_grads([f"model={model}"]) for model in CHOICES}


@pytest.mark.parametrize("model,choice", CASES)
def test_recompute_gives_the_loss_and_gradients_of_none(model, choice, references):
    loss, grads, saved = _loss_and_grads([f"model={model}", *CHOICES[model][choice]])
    ref_loss, ref_grads, ref_saved = references[model]
    assert saved < ref_saved, f"{model} {choice}: {saved} bytes saved for backward, not fewer than {ref_saved}"
    assert loss == ref_loss, f"{model} {choice}: loss {loss} vs {ref_loss} without recompute"
    assert grads.keys() == ref_grads.keys()
    worst = max(((grads[k] - ref_grads[k]).norm() / ref_grads[k].norm().clamp_min(1e-30)).item() for k in grads)
    assert worst <= 1e-6, f"{model} {choice}: largest relative gradient difference {worst:.2e}"


def _activations(*overrides: str) -> int:
    run = load_run_config(["model=nemotron_h_8b", "model.seq_length=8192", "train.seq_length=8192",
                           "train.micro_batch_size=1", *overrides])
    return memory_estimate(run.model, run.parallel, run.train, run.precision, dp=1).activations


def test_describe_activation_memory_falls_with_recompute():
    none = _activations()
    selective = _activations("train.recompute=selective")
    block = _activations("train.recompute=full", "train.recompute_method=block", "train.recompute_num_layers=26")
    full = _activations("train.recompute=full")
    assert none > selective > full, (none, selective, full)
    assert none > block > full, (none, block, full)
    # Recomputing only the attention core saves nothing with fused attention.
    assert _activations("train.recompute=selective", "train.recompute_modules=[core_attn]") == none


BAD = {
    "unknown choice": (["train.recompute=partial"], ["train.recompute='partial'", "selective"]),
    "more layers than a stage": (["train.recompute=full", "train.recompute_num_layers=8"],
                                 ["train.recompute_num_layers=8", "7 layers"]),
    "module of an absent layer": (["train.recompute=selective", "train.recompute_modules=[moe_act]"],
                                  ["moe_act", "'E'"]),
    "nothing selective in Mamba": (["train.recompute=selective", "model.pattern=MMMM"],
                                   ["train.recompute=selective", "train.recompute=full"]),
    "modules without selective": (["train.recompute_modules=[mlp]"], ["train.recompute_modules", "selective"]),
    "unknown module": (["train.recompute=selective", "train.recompute_modules=[attn]"], ["attn", "core_attn"]),
    "full with cuda graphs": (["train.recompute=full", "train.cuda_graphs=true"],
                              ["train.recompute=full", "train.cuda_graphs"]),
    "moe_act under delayed FP8": (["model=tiny_moe", "precision=fp8_delayed", "train.recompute=selective"],
                                  ["moe_act", "delayed"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_impossible_recompute_is_one_line(case):
    assert_refused_in_one_line(case, *BAD[case])
