"""bench/compress.py --tiny (the worked example of docs/compression.md, here shortened to a few steps and
scored on 2 validation batches, 16 windows, instead of 16):
one table row per precision (time to score, loss before and after distillation, both throughputs);
first the side by side with modelopt, whose "ours" row is evaluated on the very validation batches of
the distillation and whose modelopt row says why it did not run (no modelopt, no Transformer Engine or
no GPU); then the quality side by side of pruned, distilled, pruned + LM-only, scratch and longer
scratch at two seeds on the same validation windows, with paired differences; the learning-rate sweep."""

import json
import sys

import numpy as np
import pytest

from pipeline.compress.config import CompressConfig
from tests.distributed.compress_runs import records, run_cpu
from tests.distributed.training import REPO

SEEDS, ITERS, PARENT_ITERS, EVAL_ITERS = (1234, 7), 3, 4, 2
SCALE = CompressConfig().lr_scale
"""The table's runs are at the default compress.lr_scale; the sweep adds the full rate."""


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = run_cpu([sys.executable, "bench/compress.py", "--tiny", "--out", str(out), "--iters", str(ITERS),
                    "--parent-iters", str(PARENT_ITERS), "--eval-iters", str(EVAL_ITERS),
                    "--seeds", ",".join(map(str, SEEDS)), "--lr-scales", f"1,{SCALE:g}"], timeout=1200)
    return proc, json.loads((out / "bench_compress.json").read_text())["runs"]["fp32"], out / "fp32" / "runs"


def test_compress_benchmark_smoke_on_cpu(bench):
    proc, row, _ = bench
    assert row["score_s"] > 0 and row["kd_tokens_per_s"] > 0 and row["plain_tokens_per_s"] > 0, row
    assert row["loss_after"] < row["loss_before"], row
    assert row["windows"] == EVAL_ITERS * 8, "--eval-iters global batches of 8 windows score every model"
    assert "KD tok/s" in proc.stdout and "bench/compress.py took" in proc.stdout


def test_quality_rows_share_the_loops_validation_windows(bench):
    """At the base seed each run's own validation (the loop's) is the bench's per-window mean."""
    _, row, runs = bench
    quality = {r["model"]: r for r in row["quality"]}
    assert list(quality) == ["parent", "pruned", "distilled", "lm_only", "scratch", "scratch_long"]
    assert [quality[m]["steps"] for m in quality] == [PARENT_ITERS, 0, ITERS, ITERS, ITERS, PARENT_ITERS + ITERS]
    kd = records(runs / f"distilled_x{SCALE:g}_{ITERS}_s{SEEDS[0]}", "valid")
    assert quality["pruned"]["loss"] == pytest.approx(kd[0]["student_loss"], rel=1e-5)
    assert quality["parent"]["loss"] == pytest.approx(kd[0]["teacher_loss"], rel=1e-5)
    assert quality["distilled"]["per_seed"][0] == pytest.approx(kd[-1]["student_loss"], rel=1e-5)
    for model, run in (("lm_only", f"lm_only_x{SCALE:g}_{ITERS}"), ("scratch", f"scratch_{ITERS}"),
                       ("scratch_long", f"scratch_long_{PARENT_ITERS + ITERS}")):
        own = records(runs / f"{run}_s{SEEDS[0]}", "valid")[-1]["loss"]
        assert quality[model]["per_seed"][0] == pytest.approx(own, rel=1e-5), model


def test_seeds_change_the_training_and_differences_are_paired(bench):
    _, row, _ = bench
    quality = {r["model"]: r for r in row["quality"]}
    for model in ("distilled", "lm_only", "scratch"):
        first, second = quality[model]["per_seed"]
        assert first != second, f"{model}: seeds {SEEDS} trained the same model"
        assert quality[model]["loss"] == pytest.approx(np.mean([first, second]))
    for r in row["quality"]:
        assert r["minus_distilled"] == pytest.approx(r["loss"] - quality["distilled"]["loss"], abs=1e-9)
        assert (r["se"] > 0) == (r["model"] != "distilled"), r


def test_sweep_reuses_the_tables_runs(bench):
    proc, row, _ = bench
    sweep = {r["lr_scale"]: r for r in row["sweep"]}
    assert sorted(sweep) == [SCALE, 1.0] and sweep[1.0]["peak_lr"] == pytest.approx(sweep[SCALE]["peak_lr"] / SCALE)
    quality = {r["model"]: r for r in row["quality"]}
    assert sweep[SCALE]["distilled_per_seed"] == quality["distilled"]["per_seed"]
    assert sweep[SCALE]["lm_only_per_seed"] == quality["lm_only"]["per_seed"]
    assert sweep[1.0]["distilled"] != sweep[SCALE]["distilled"]
    assert "learning-rate sweep" in proc.stdout and "pruned + LM-only (no teacher)" in proc.stdout


def test_side_by_side_evaluates_ours_on_the_distillation_validation_batches(bench):
    proc, row, _ = bench
    ours, modelopt = row["side_by_side"]["ours"], row["side_by_side"]["modelopt"]
    assert ours["val_loss"] == pytest.approx(row["loss_before"], rel=1e-6), (ours, row["loss_before"])
    assert ours["params"] == row["student_params"], "the student evaluated is not the one searched"
    assert modelopt["error"] in ("modelopt not installed",
                                 "modelopt's megatron plugin imports transformer_engine, which is not installed",
                                 "mcore_minitron needs CUDA (it gathers the kept layers' counts on CUDA); "
                                 "not run on cpu"), modelopt
    assert "side by side at fp32" in proc.stdout and modelopt["error"] in proc.stdout
    assert proc.stdout.index("side by side at fp32") < proc.stdout.index("quality at fp32"), \
        "the modelopt side by side trains nothing: it comes first, so a run cut at a time limit still shows it"


def test_moe_parent_is_pruned_to_a_fraction_of_its_active_parameters(tmp_path):
    """--moe: the same benchmark on a tiny_moe parent, the student searched at --target-fraction of
    the parent's active parameters; with --no-modelopt no side by side, the quality table printed once.
    The corpus is --data, made the way docs/compression.md "Benchmark" makes its (`pipeline.data
    preprocess` of .py files, the tokenizer linked beside), and --precisions names the preset."""
    from omegaconf import OmegaConf

    from pipeline.compress.distill import model_of
    from pipeline.model.sizes import active_param_count

    data = tmp_path / "big"
    run_cpu([sys.executable, "-m", "pipeline.data", "preprocess", "--input", "pipeline/**/*.py", "--format", "text",
             "--workers", "1", "--tokenizer", "data/build/tokenizer", "--output", str(data / "corpus_text_document")],
            timeout=600)
    (data / "tokenizer").symlink_to(REPO / "data" / "build" / "tokenizer")
    out = tmp_path / "out"
    proc = run_cpu([sys.executable, "bench/compress.py", "--tiny", "--moe", "--data", str(data), "--precisions",
                    "fp32", "--out", str(out), "--iters", "1", "--parent-iters", "2", "--eval-iters", str(EVAL_ITERS),
                    "--seeds", "1234", "--target-fraction", "0.8", "--no-modelopt"], timeout=1200)
    row = json.loads((out / "bench_compress.json").read_text())["runs"]["fp32"]
    parent = model_of(out / "parent" / "checkpoints" / "step_0000002")
    student = model_of(out / "fp32" / "student" / "checkpoints" / "step_0000000")
    assert parent.name == "tiny_moe" and "E" in student.pattern, (parent, student)
    assert active_param_count(student) <= 0.8 * active_param_count(parent), row["label"]
    assert "side_by_side" not in row and "side by side at" not in proc.stdout, proc.stdout[-2000:]
    assert proc.stdout.count("quality at fp32") == 1, proc.stdout[-2000:]
    assert "80% of its active parameters" in proc.stdout
    parent_data = OmegaConf.load(out / "parent" / "config.yaml").data.paths
    assert parent_data == [str(data / "corpus_text_document")], f"the parent trained on {parent_data}, not --data"
