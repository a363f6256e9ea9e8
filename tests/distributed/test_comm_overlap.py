"""Communication overlap changes when gradients and parameters move, not what they are: with
overlapped gradient reduce (alone, and with the parameter all-gather; several buckets) the losses over 4
steps equal those of one DP2 run without (within 1e-6; fp32, packed documents, CPU, gloo), at DP2, TP2 x DP2
and PP2 (2 virtual stages) x DP2 (these layouts train this model to the same bits on CPU, measured), and a
run saved with overlap on resumes with it off on the same curve."""

import pytest

from tests.distributed.training import losses, max_rel_diff, train

# One 4-segment model for every layout ('|' ignored at pp=1), so all compare with one DP2 run
# without overlap: a 4-process reference per layout would cost about 25 s each on 2 CPU cores.
STEPS = ["train.iters=4", "train.packed_documents=true", "model.pattern=M-|M*|-M|-*"]
# ~100k parameters per bucket splits the tiny model (1.8M) into about a dozen buckets, so buckets
# are reduced and gathered one after another (megatron's default, 40M, would make one).
GRAD_ONLY = ["parallel.overlap_grad_reduce=true", "parallel.bucket_size=100000"]
OVERLAP = [*GRAD_ONLY, "parallel.overlap_param_gather=true"]
# pp2_vp2_dp2: the interleaved schedule, which takes one no_sync/grad_sync hook per model chunk.
LAYOUTS = {"dp2": (2, []), "tp2_dp2": (4, ["parallel.tp=2"]), "pp2_vp2_dp2": (4, ["parallel.pp=2"])}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Losses of the DP2 run without overlap."""
    run_dir = tmp_path_factory.mktemp("dp2_no_overlap")
    train(run_dir, 2, *STEPS)
    return losses(run_dir)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_overlap_matches_no_overlap(layout, reference, tmp_path):
    nproc, overrides = LAYOUTS[layout]
    train(tmp_path, nproc, *STEPS, *overrides, *OVERLAP)
    got = losses(tmp_path)
    assert len(got) == 4
    diff = max_rel_diff(got, reference)
    assert diff <= 1e-6, f"{layout}: losses {got} with overlap vs {reference} at DP2 without ({diff:.2e})"


def test_gradient_overlap_alone_matches_no_overlap(reference, tmp_path):
    train(tmp_path, 2, *STEPS, *GRAD_ONLY)
    diff = max_rel_diff(losses(tmp_path), reference)
    assert diff <= 1e-6, f"losses {losses(tmp_path)} with overlapped gradient reduce vs {reference} ({diff:.2e})"


def test_saved_with_overlap_resumes_without(reference, tmp_path):
    """The save after step 2 runs while the overlapped all-gather of step 2's update is pending: the
    checkpoint must hold the updated weights of every shard, not only this rank's."""
    first = train(tmp_path, 2, *STEPS, *OVERLAP, "train.exit_after_steps=2")
    assert "stopping at step 2" in first.stdout
    train(tmp_path, 2, *STEPS)
    diff = max_rel_diff(losses(tmp_path), reference)
    assert diff <= 1e-6, f"overlap on for steps 1-2, off for 3-4: {losses(tmp_path)} vs {reference} ({diff:.2e})"
