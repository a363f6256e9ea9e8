"""GPU: importance hooks see the same activations on the Transformer Engine + mamba-ssm backend as on
the portable one (same weights, fp32), so scores computed on a GPU match the CPU reference.
Skipped without CUDA.

    python -m pytest tests/gpu/test_compress_importance_te.py -s
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _scores(world, backend: str):
    from pipeline.compress.importance import score_model
    from pipeline.config import load_run_config
    from pipeline.model.build import build_model
    from pipeline.training.batches import ModelInputs

    run = load_run_config(["precision=fp32", "train.seed=5"])
    chunks = build_model(run.model, run.parallel, run.precision, run.train.seed, world.device, backend=backend)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        tokens = torch.randint(0, run.model.vocab_size, (2, 128), generator=gen).to(world.device)
        batches.append(ModelInputs(tokens, torch.arange(128, device=world.device).expand(2, -1),
                                   torch.roll(tokens, -1, 1), torch.ones(2, 128, device=world.device), None))
    return score_model(chunks, run.model, batches, layer_batches=1, seq_length=128)


def test_te_backend_scores_match_the_portable_backend():
    from pipeline.distributed import ParallelConfig, distributed

    with distributed(ParallelConfig(), None, "cuda") as world:
        (te_hidden, te_units, te_layers), (hidden, units, layers) = _scores(world, "te"), _scores(world, "portable")

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    assert rel(te_hidden, hidden) < 1e-2
    for kind, per_layer in units.items():
        for i, ref in per_layer.items():
            assert rel(te_units[kind][i], ref) < 1e-2, f"{kind}[{i}] differs between backends"
    assert rel(te_layers["block_influence"], layers["block_influence"]) < 1e-2
    assert rel(te_layers["logit_mse_increase"], layers["logit_mse_increase"]) < 5e-2
