"""`train.recompute` as users run it: the trainer with each choice logs the losses of none (fp32, CPU)."""

import pytest

from tests.distributed.training import losses, max_rel_diff, train

STEPS = ["train.iters=3", "model.pattern=M-M*-M-*"]
CHOICES = {
    "selective": ["train.recompute=selective"],
    "full_block": ["train.recompute=full", "train.recompute_method=block", "train.recompute_num_layers=4"],
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("none")
    train(run_dir, 1, *STEPS)
    return losses(run_dir)


@pytest.mark.parametrize("choice", sorted(CHOICES))
def test_recompute_trains_like_none(choice, reference, tmp_path):
    train(tmp_path, 1, *STEPS, *CHOICES[choice])
    got = losses(tmp_path)
    assert len(got) == 3
    diff = max_rel_diff(got, reference)
    assert diff <= 1e-6, f"{choice}: losses {got} vs none {reference} (max relative diff {diff:.2e})"
