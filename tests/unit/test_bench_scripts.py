"""The benchmarks outside the package run as their docstrings say (bench/README.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_hf_export_bench_runs_as_a_script_from_any_directory(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "hf_export.py"), "--model", "tiny", "--dir", str(tmp_path / "b")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["model"] == "tiny" and result["export_bytes_written"] > 0, result
    assert not (tmp_path / "b").exists(), "the scratch directory must be deleted without --keep"


@pytest.mark.parametrize("module, option", [("bench.fp8_convergence", "--data"), ("bench.train", "--presets"),
                                            ("bench.profile_step", "--kernel-cache")])
def test_gpu_bench_runs_as_a_module(module, option):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and option in proc.stdout, proc.stderr[-3000:]


def test_gpu_bench_runs_as_a_script_from_any_directory(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "profile_step.py"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "--run" in proc.stdout, proc.stderr[-3000:]


def test_preprocess_bench_runs_as_a_script():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "preprocess.py"), "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--megatron-lm" in proc.stdout, proc.stderr[-3000:]


def merged_tables(tmp_path: Path, preset: str, runs: dict[str, list[dict]]) -> str:
    """`bench/train.py --tables` over one results directory per entry of `runs`; its stdout."""
    for name, rows in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{preset}.json").write_text(json.dumps(rows))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "train.py"), "--tables",
                           *(str(tmp_path / name) for name in runs)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def rows_of(stdout: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in stdout.splitlines() if line.startswith(("bf16", "fp8"))}


def test_train_bench_merges_tables_of_benchmarks_run_side_by_side(tmp_path):
    row = {"preset": "bench_8b_width", "flops_per_step": 1e15, "peak_tflops": 1000.0, "mem_gib": 100.0}
    out = merged_tables(tmp_path, "bench_8b_width", {"gpu0": [{**row, "run": "bf16", "step_s": 3.0}],
                                                     "gpu1": [{**row, "run": "fp8_delayed", "step_s": 2.0}]})
    lines = rows_of(out)
    assert lines["fp8_delayed"][4] == "1.50x", out  # 3.0 s / 2.0 s, against the other GPU's BF16 row
    assert lines["bf16"][3] == "33.3%", out  # 1e15 FLOP / 3.0 s against a 1000 TFLOP/s peak


def test_train_bench_leaves_the_fp8_speed_up_blank_without_a_bf16_row(tmp_path):
    row = {"preset": "bench_moe", "flops_per_step": 1e15, "peak_tflops": 1000.0, "mem_gib": 60.0}
    out = merged_tables(tmp_path, "bench_moe", {"gpu0": [{**row, "run": "fp8_tensorwise+graphs", "step_s": 2.0}]})
    assert rows_of(out)["fp8_tensorwise+graphs"][4] == "-" and "nan" not in out, out  # no BF16 row with graphs


def test_train_bench_merged_table_uses_each_benchmarks_batch_shape(tmp_path):
    row = {"preset": "bench_moe", "run": "fp8_tensorwise", "flops_per_step": 1e15, "peak_tflops": 1000.0,
           "mem_gib": 60.0, "seq": 8192, "step_s": 2.0}
    out = merged_tables(tmp_path, "bench_moe", {"gpu0": [{**row, "micro": 2, "global": 4}],
                                                "gpu1": [{**row, "run": "bf16", "micro": 1, "global": 8}]})
    assert "micro-batch 2, global batch 4" in out, out
    assert rows_of(out)["fp8_tensorwise"][1] == "16,384", out  # 4 x 8192 tokens in 2.0 s, not a batch of 8
    assert rows_of(out)["bf16"][1] == "32,768", out  # its own 8 x 8192 tokens in 2.0 s
    assert "  micro-batch 1, global batch 8" in out, out  # a row of another shape says its own


@pytest.mark.parametrize("extra, message", [
    (["--runs", "bf16,fp8_typo"], "unknown run fp8_typo"),
    (["--parallel", "--runs", "bf16"], "none is visible"),
    (["--global-batch", "6"], "--global-batch 6 is not a positive multiple of the micro-batch 4"),
])
def test_fp8_convergence_refuses_bad_arguments_before_training(tmp_path, extra, message):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "fp8_convergence.py"), "--data", str(tmp_path),
                           "--out", str(tmp_path / "out"), *extra], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists(), "a refused benchmark must not create its --out"


@pytest.mark.parametrize("extra, message", [
    (["--runs", "bf16+grafs"], "error: unknown run bf16+grafs"),
    (["--runs", "bf16", "--set", "train.typo=1"], "error: unknown config key train.typo"),
    (["--presets", "bench_1p5x", "--runs", "bf16"], "error: In 'config': Could not find 'model/bench_1p5x'"),
    (["--runs", "bf16", "--micro-batch", "3"], "error: train.global_batch_size=8 is not a multiple of "
                                               "train.micro_batch_size=3"),
    (["--runs", "bf16", "--set", "train.expandable_segments=false"], "error: bench/train.py measures GPU training"),
])
def test_train_bench_refuses_bad_arguments_before_any_run(tmp_path, extra, message):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "train.py"), "--out", str(tmp_path / "out"), *extra],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-2000:]
    assert not (tmp_path / "out").exists(), "a refused benchmark must not create its --out"


def test_train_bench_micro_batch_reaches_each_runs_process(monkeypatch, tmp_path):
    """--micro-batch is passed to the process that measures a run, whose config (and bare step) use it."""
    import argparse

    from bench import train as train_bench

    commands = []

    def fake_run(cmd, **kwargs):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, json.dumps({"step_s": 1.0}) + "\n", "")

    monkeypatch.setattr(train_bench.subprocess, "run", fake_run)
    monkeypatch.setattr(train_bench, "MICRO", 2)
    args = argparse.Namespace(set=[], steps=4, data=tmp_path, out=tmp_path)
    train_bench.measure(args, "bench_moe", "fp8_tensorwise", "pipeline")
    (cmd,) = commands
    assert cmd[cmd.index("--micro-batch") + 1] == "2", cmd
    assert "train.micro_batch_size=2" in train_bench.overrides("bench_moe", "bf16", tmp_path, 4, tmp_path, tmp_path)
