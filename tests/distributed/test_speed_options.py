"""The speed options of the trainer as a user switches them on a CPU machine: the GPU-only ones fail at
once with one line; the kernel cache, the start-up timing records, checkpoint.save_at_end and
train.expandable_segments (a no-op without CUDA; tests/gpu/test_allocator.py checks its effect) work everywhere."""

import json
import subprocess
import sys

import pytest

from tests.distributed.training import BASE, REPO, run_cpu


@pytest.mark.parametrize("option", ["train.cuda_graphs=true", "train.fused_cross_entropy=true"])
def test_gpu_only_option_on_cpu_fails_in_one_line_before_writing(tmp_path, option):
    run_dir = tmp_path / "run"
    proc = run_cpu([sys.executable, "-m", "pipeline.train", *BASE, f"run_dir={run_dir}", option], check=False)
    name = option.split("=")[0]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {name}=true needs a GPU (this run is on cpu); set {name}=false"), proc.stderr[-2000:]
    assert not run_dir.exists(), "a refused run must not create its run directory"


def test_kernel_cache_timing_records_and_no_final_save(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "shared" / "kernels"
    run_cpu([sys.executable, "-m", "pipeline.train", *BASE, f"run_dir={run_dir}", "train.iters=11",
             f"train.kernel_cache={cache}", "checkpoint.save_at_end=false", "train.expandable_segments=false"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timing = [r for r in rows if r["kind"] == "timing"]
    assert [r["step"] for r in timing] == [1, 10], timing
    first, steady = timing
    assert 0 < first["first_step_s"] and 0 < first["startup_s"] < 300, first
    assert 0 < steady["steady_step_s"] and steady["first_step_vs_steady"] > 0, steady
    # No Triton kernel runs on CPU: nothing is tuned, so nothing is written (a GPU run writes
    # autotune.json there: docs/performance.md, Start-up); the run directory gets no cache of its own.
    assert not (run_dir / "kernel_cache").exists()
    assert not (cache / "autotune.json").exists()
    assert not list((run_dir / "checkpoints").glob("step_*")), "checkpoint.save_at_end=false saved at the end"
    assert (run_dir / "DONE").is_file()


def test_kernel_cache_is_a_documented_train_option():
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    for key in ("kernel_cache", "cuda_graphs", "expandable_segments"):
        assert proc.returncode == 0 and key in proc.stdout, f"{key} missing from --help: {proc.stdout[-2000:]}"
