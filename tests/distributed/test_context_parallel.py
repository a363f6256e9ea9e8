"""Context parallelism (parallel.cp) on CPU processes (gloo, portable backend): every sequence split over
the cp ranks trains the same model as one rank holding it whole. Losses and gradient norms of CP=2 and
TP=2 x CP=2 equal CP=1 within 1e-5 (fp32), with and without packed documents, on a pattern with Mamba,
attention and FFN layers; a checkpoint saved at CP=1 resumes at CP=2."""

import json
from pathlib import Path

import pytest

from tests.distributed.training import losses, max_rel_diff, train

STEPS = ["train.iters=3", "model.pattern=M*-M*-"]
PACKED = {"packed": "train.packed_documents=true", "dense": "train.packed_documents=false"}


def grad_norms(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["grad_norm"] for row in rows if row["kind"] == "train"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """CP=1 runs, one process each: the losses and gradient norms every layout must reproduce."""
    out = {}
    for name, packed in PACKED.items():
        run_dir = tmp_path_factory.mktemp(f"cp1_{name}")
        train(run_dir, 1, *STEPS, packed)
        out[name] = losses(run_dir), grad_norms(run_dir)
    return out


def _assert_same(run_dir: Path, reference: tuple[dict, dict], what: str) -> None:
    ref_losses, ref_norms = reference
    got = losses(run_dir)
    assert len(got) == 3, got
    diff = max_rel_diff(got, ref_losses)
    assert diff <= 1e-5, f"{what}: losses {got} vs CP=1 {ref_losses} (max relative diff {diff:.2e})"
    norm_diff = max_rel_diff(grad_norms(run_dir), ref_norms)
    assert norm_diff <= 1e-5, f"{what}: gradient norms differ from CP=1 by {norm_diff:.2e}"


@pytest.mark.parametrize("packed", sorted(PACKED))
def test_cp2_trains_like_cp1(packed, reference, tmp_path):
    out = train(tmp_path, 2, *STEPS, PACKED[packed], "parallel.cp=2")
    assert "cp=2 dp=1" in out.stdout
    _assert_same(tmp_path, reference[packed], f"CP=2 {packed}")


def test_tp2_cp2_trains_like_cp1(reference, tmp_path):
    train(tmp_path, 4, *STEPS, PACKED["packed"], "parallel.tp=2", "parallel.cp=2")
    _assert_same(tmp_path, reference["packed"], "TP=2 x CP=2 packed")


def test_checkpoint_from_cp1_resumes_at_cp2(reference, tmp_path):
    train(tmp_path, 1, *STEPS, PACKED["packed"], "train.exit_after_steps=1")
    second = train(tmp_path, 2, *STEPS, PACKED["packed"], "parallel.cp=2")
    assert "saved at tp=1 pp=1 cp=1" in second.stdout
    resumed = {step: loss for step, loss in losses(tmp_path).items() if step > 1}
    expected = {step: loss for step, loss in reference["packed"][0].items() if step > 1}
    diff = max_rel_diff(resumed, expected)
    assert diff <= 1e-5, f"CP=1 -> CP=2 resume drifts from the CP=1 run by {diff:.2e}"
