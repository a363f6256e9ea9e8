"""bench/compress.py runs on CPU with the tiny model (its smoke test): one table row per precision
with the time to score, the pruned student's loss before and after distillation and both
throughputs; then the side by side with modelopt, whose "ours" row is evaluated on the very
validation batches of the distillation (the same loss as its step-0 record) and whose modelopt
row says why it did not run (no modelopt, or no GPU)."""

import json
import sys

import pytest

from tests.distributed.compress_runs import run_cpu


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = run_cpu([sys.executable, "bench/compress.py", "--tiny", "--out", str(out)])
    return proc, json.loads((out / "bench_compress.json").read_text())["runs"]["fp32"]


def test_compress_benchmark_smoke_on_cpu(bench):
    proc, row = bench
    assert row["score_s"] > 0 and row["kd_tokens_per_s"] > 0 and row["plain_tokens_per_s"] > 0, row
    assert row["loss_after"] < row["loss_before"], row
    assert "KD tok/s" in proc.stdout


def test_side_by_side_evaluates_ours_on_the_distillation_validation_batches(bench):
    proc, row = bench
    ours, modelopt = row["side_by_side"]["ours"], row["side_by_side"]["modelopt"]
    assert ours["val_loss"] == pytest.approx(row["loss_before"], rel=1e-6), (ours, row["loss_before"])
    assert ours["params"] == row["student_params"], "the student evaluated is not the one searched"
    assert modelopt["error"] in ("modelopt not installed", "mcore_minitron needs CUDA and Transformer Engine; "
                                 "not run on cpu"), modelopt
    assert "side by side at fp32" in proc.stdout and modelopt["error"] in proc.stdout
