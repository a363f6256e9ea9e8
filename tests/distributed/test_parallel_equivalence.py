"""From the same seed and global batch, every parallel layout trains the same tiny model the same way:
losses over 5 steps agree with TP=1/PP=1 within 1e-5 (fp32, CPU, gloo)."""

import pytest

from tests.distributed.training import losses, max_rel_diff, train

STEPS = ["train.iters=5"]
# A 4-segment pattern so PP=2 also runs with 2 virtual stages (interleaved schedule); every
# layout below trains this same model.
# With pp=1 the '|' are ignored; without them PP=2 splits the 8 layers 4/4.
SEGMENTED = "model.pattern=M-|M*|-M|-*"
PLAIN = "model.pattern=M-M*-M-*"

LAYOUTS = {
    "tp2": (2, ["parallel.tp=2", SEGMENTED]),
    "pp2": (2, ["parallel.pp=2", PLAIN]),
    "pp2_vp2": (2, ["parallel.pp=2", SEGMENTED]),
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2", PLAIN]),
    "dp2_distopt": (2, ["parallel.distributed_optimizer=true", SEGMENTED]),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tp1pp1")
    train(run_dir, 1, *STEPS, SEGMENTED)
    return losses(run_dir)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_process(layout, reference, tmp_path):
    nproc, overrides = LAYOUTS[layout]
    train(tmp_path, nproc, *STEPS, *overrides)
    got = losses(tmp_path)
    assert len(got) == 5
    diff = max_rel_diff(got, reference)
    assert diff <= 1e-5, f"{layout}: losses {got} vs TP=1/PP=1 {reference} (max relative diff {diff:.2e})"
