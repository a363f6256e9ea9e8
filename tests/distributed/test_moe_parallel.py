"""Mixture-of-experts layers train the same under every expert layout: `tiny_moe` (packed documents, the default)
from one seed and global batch gives the single-process losses within 1e-5 with its experts split over two
ranks (EP2), each expert split over two ranks (ETP2), or tensor parallel with sequence parallel beside EP2 on four
ranks (TP2 x EP2), and a checkpoint saved at EP2 resumes at ETP2 and at EP1 (fp32, CPU, gloo).

Not covered on CPU: EP2 x ETP2 (gloo's all_gather cannot gather the uneven token counts the dispatcher sends; NCCL
can)."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.distributed.training import BASE, losses, max_rel_diff, run_cpu, train

STEPS = ["model=tiny_moe", "train.iters=6"]
LAYOUTS = {
    "ep2": (2, ["parallel.ep=2"]),
    "etp2": (2, ["parallel.etp=2"]),
    "tp2xep2": (4, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.ep=2"]),
}


MOE_KEYS = ("moe_load_max_over_mean", "moe_expert_bias_range", "moe_aux_loss")


def moe_metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    """Step -> the MoE load-balance metrics of the training records in metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: r[k] for k in MOE_KEYS} for r in rows if r["kind"] == "train"}


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ep1")
    train(run_dir, 1, *STEPS)
    return run_dir


@pytest.fixture(scope="module")
def reference(reference_dir):
    return losses(reference_dir)


def test_load_balance_metrics_are_logged_and_bias_moves_by_its_rate(reference_dir):
    got = moe_metrics(reference_dir)
    rate = 1e-3  # tiny_moe's model.moe.bias_update_rate
    for step, m in got.items():
        assert m["moe_load_max_over_mean"] >= 1.0, (step, m)
        # Each step moves every expert's bias by +-rate (or 0 when exactly at the mean).
        assert m["moe_expert_bias_range"] <= 2 * rate * step + 1e-6, (step, m)
        assert m["moe_aux_loss"] > 0, (step, m)
    assert got[1]["moe_expert_bias_range"] == pytest.approx(2 * rate, rel=1e-3), got[1]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_expert_layout_matches_single_process(layout, reference, reference_dir, tmp_path):
    nproc, overrides = LAYOUTS[layout]
    train(tmp_path, nproc, *STEPS, *overrides)
    got = losses(tmp_path)
    assert len(got) == 6
    diff = max_rel_diff(got, reference)
    assert diff <= 1e-5, f"{layout}: losses {got} vs EP=1 {reference} (max relative diff {diff:.2e})"
    # The load-balance metrics describe the global batch: the same under every layout.
    ours, single = moe_metrics(tmp_path), moe_metrics(reference_dir)
    for step in single:
        assert ours[step] == pytest.approx(single[step], rel=1e-4, abs=1e-6), (layout, step)


@pytest.fixture(scope="module")
def stopped_at_ep2(tmp_path_factory):
    """A run dir stopped after 3 of its steps at EP2 (its checkpoint at step 3); each test resumes a copy."""
    run_dir = tmp_path_factory.mktemp("ep2_stopped")
    train(run_dir, 2, *STEPS, "parallel.ep=2", "train.exit_after_steps=3")
    return run_dir


def test_checkpoint_from_ep2_resumes_at_etp2(reference, stopped_at_ep2, tmp_path):
    shutil.copytree(stopped_at_ep2, tmp_path, dirs_exist_ok=True)
    second = train(tmp_path, 2, *STEPS, "parallel.etp=2")
    assert "at step 3" in second.stdout, second.stdout[-2000:]
    resumed = {s: v for s, v in losses(tmp_path).items() if s > 3}
    diff = max_rel_diff(resumed, {s: v for s, v in reference.items() if s > 3})
    assert diff <= 1e-5, f"EP=2 -> ETP=2 resume drifts from the EP=1 run by {diff:.2e}: {resumed} vs {reference}"


def test_checkpoint_from_ep2_resumes_at_ep1(reference, stopped_at_ep2, tmp_path):
    """The optimizer is a dense + expert pair at every layout (build.py), so its state loads across EP."""
    shutil.copytree(stopped_at_ep2, tmp_path, dirs_exist_ok=True)
    second = train(tmp_path, 1, *STEPS)
    assert "at step 3" in second.stdout, second.stdout[-2000:]
    resumed = {s: v for s, v in losses(tmp_path).items() if s > 3}
    diff = max_rel_diff(resumed, {s: v for s, v in reference.items() if s > 3})
    assert diff <= 1e-5, f"EP=2 -> EP=1 resume drifts from the EP=1 run by {diff:.2e}: {resumed} vs {reference}"


def test_gpu_only_moe_option_on_cpu_exits_2_with_one_line(tmp_path):
    cmd = [sys.executable, "-m", "pipeline.train", *BASE, f"run_dir={tmp_path}", *STEPS, "device=cpu",
           "model.moe.token_dispatcher=flex"]
    result = run_cpu(cmd, check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert "model.moe.token_dispatcher=flex" in errors[0] and "alltoall" in errors[0]
