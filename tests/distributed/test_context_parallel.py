"""Context parallelism (parallel.cp) on CPU processes (gloo, portable backend): every sequence split over
the cp ranks trains the same model as one rank holding it whole. Losses and gradient norms of CP=2 and
TP=2 x CP=2 equal CP=1 within 1e-5 (fp32), with and without packed documents, on a pattern with Mamba,
attention and FFN layers; a checkpoint saved at CP=1 resumes at CP=2. TP=2 x CP=2 also runs the paths
for fewer Mamba and KV groups per TP rank (1) than CP ranks."""

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


def _assert_same(run_dir: Path, reference: tuple[dict, dict], what: str, after: int = 0) -> None:
    """Losses and gradient norms of the steps after `after` equal the CP=1 run's within 1e-5."""
    ref_losses, ref_norms = ({s: v for s, v in values.items() if s > after} for values in reference)
    got = {s: v for s, v in losses(run_dir).items() if s > after}
    assert len(got) == 3 - after, got
    diff = max_rel_diff(got, ref_losses)
    assert diff <= 1e-5, f"{what}: losses {got} vs CP=1 {ref_losses} (max relative diff {diff:.2e})"
    norms = {s: v for s, v in grad_norms(run_dir).items() if s > after}
    norm_diff = max_rel_diff(norms, ref_norms)
    assert norm_diff <= 1e-5, f"{what}: gradient norms differ from CP=1 by {norm_diff:.2e}"


def test_cp2_trains_like_cp1(reference, tmp_path):
    out = train(tmp_path, 2, *STEPS, PACKED["dense"], "parallel.cp=2")
    assert "cp=2 dp=1" in out.stdout
    _assert_same(tmp_path, reference["dense"], "CP=2 dense")


def test_cp1_checkpoint_resumes_at_cp2_and_trains_like_cp1(reference, tmp_path):
    """Packed documents: steps 2-3 at CP=2, from a checkpoint saved at CP=1 after step 1."""
    train(tmp_path, 1, *STEPS, PACKED["packed"], "train.exit_after_steps=1")
    second = train(tmp_path, 2, *STEPS, PACKED["packed"], "parallel.cp=2")
    assert "saved at tp=1 pp=1 cp=1" in second.stdout
    _assert_same(tmp_path, reference["packed"], "CP=1 -> CP=2 packed", after=1)


def test_tp2_cp2_trains_like_cp1(reference, tmp_path):
    train(tmp_path, 4, *STEPS, PACKED["packed"], "parallel.tp=2", "parallel.cp=2")
    _assert_same(tmp_path, reference["packed"], "TP=2 x CP=2 packed")
