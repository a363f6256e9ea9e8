"""The benchmarks outside the package run as their docstrings say (bench/README.md)."""

import json
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
