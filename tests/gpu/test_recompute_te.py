"""GPU: activation recompute (train.recompute) on the Transformer Engine backend gives the loss and
gradients of none, and holds less memory at the peak of a forward. Skipped without CUDA.

    python -m pytest tests/gpu/test_recompute_te.py -s
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

EOD = 0
CHOICES = {
    "tiny": {
        "selective": ["train.recompute=selective"],
        "full_uniform_2": ["train.recompute=full", "train.recompute_num_layers=2"],
        "full_block_3": ["train.recompute=full", "train.recompute_method=block", "train.recompute_num_layers=3"],
    },
    "tiny_moe": {
        "selective": ["train.recompute=selective"],
        "full_uniform_1": ["train.recompute=full"],
    },
}
CASES = [(model, name) for model, choices in CHOICES.items() for name in choices]


@pytest.fixture(scope="module")
def world():
    from pipeline.distributed import ParallelConfig, distributed

    with distributed(ParallelConfig(), None, "cuda") as w:
        yield w


def _step(world, overrides: list[str]) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss, gradients (on the CPU) and the memory a training forward of a packed batch added at its peak."""
    from pipeline.config import load_run_config
    from pipeline.model.build import build_model
    from pipeline.training.batches import to_model_inputs

    run = load_run_config(["precision=fp32", *overrides])
    (model,) = build_model(run.model, run.parallel, run.precision, run.train.seed, world.device, backend="te",
                           recompute=run.train)
    model.train()
    tokens = torch.randint(1, run.model.vocab_size, (2, 512), generator=torch.Generator().manual_seed(0))
    tokens[:, [100, 300]] = EOD
    batch = {"tokens": tokens, "labels": tokens.roll(-1, 1), "loss_mask": torch.ones(2, 512)}
    inputs = to_model_inputs(batch, EOD, True, world.device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = model(inputs.tokens, inputs.position_ids, None, labels=inputs.labels,
                 packed_seq_params=inputs.packed_seq_params).float().mean()
    peak = torch.cuda.max_memory_allocated() - before
    loss.backward()
    grads = {name: p.grad.cpu() for name, p in model.named_parameters() if p.grad is not None}
    del model
    torch.cuda.empty_cache()
    return loss.item(), grads, peak


@pytest.fixture(scope="module")
def references(world):
    return {model: _step(world, [f"model={model}"]) for model in CHOICES}


@pytest.mark.parametrize("model,choice", CASES)
def test_recompute_on_te_gives_the_loss_and_gradients_of_none(world, model, choice, references):
    loss, grads, peak = _step(world, [f"model={model}", *CHOICES[model][choice]])
    ref_loss, ref_grads, ref_peak = references[model]
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss), f"{model} {choice}: loss {loss} vs {ref_loss}"
    assert grads.keys() == ref_grads.keys()
    worst = max(((grads[k] - ref_grads[k]).norm() / ref_grads[k].norm().clamp_min(1e-30)).item() for k in grads)
    assert worst <= 1e-5, f"{model} {choice}: largest relative gradient difference {worst:.2e}"
    assert peak < ref_peak, f"{model} {choice}: forward peak {peak} bytes, not below none's {ref_peak}"
