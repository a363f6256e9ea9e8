"""Every model preset composes and validates; `python -m pipeline.describe` reports, or fails
with one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from pipeline.config import load_run_config
from pipeline.describe import format_report, world_size_from_env
from pipeline.errors import ConfigError
from pipeline.model import sizes

REPO = Path(__file__).resolve().parents[2]
PRESETS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))


@pytest.fixture(autouse=True)
def fresh_hydra():
    """Hydra keeps a process-wide singleton; start every test without one."""
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_and_validates(name):
    run = load_run_config([f"model={name}"])
    assert run.model.name == name


@pytest.mark.parametrize("name", [p for p in PRESETS if p != "tiny"])
def test_preset_in_proj_width_allows_fp8(name):
    run = load_run_config([f"model={name}", "precision=fp8_tensorwise"])
    assert run.model.mamba_in_proj_width % 16 == 0


@pytest.mark.parametrize("name", PRESETS)
def test_preset_starts_with_a_one_line_comment(name):
    first, second = (REPO / "conf" / "model" / f"{name}.yaml").read_text().splitlines()[:2]
    assert first.startswith("# ") and not second.startswith("#"), first


def test_world_size_defaults_to_model_parallel_and_reads_env():
    run = load_run_config(["parallel.tp=2"])
    assert world_size_from_env(run, {})[0] == 2
    assert world_size_from_env(run, {"WORLD_SIZE": "8"})[0] == 8
    with pytest.raises(ConfigError, match="WORLD_SIZE=3"):
        world_size_from_env(run, {"WORLD_SIZE": "3"})


def test_report_shows_pipeline_stage_layout():
    run = load_run_config(["model.pattern=M-M*-|M-M*-|M-|M-", "parallel.pp=2"])
    report = format_report(run, 2, "test")
    for line in ("rank 0 stage 0: layers 0-4", "rank 1 stage 0: layers 5-9",
                 "rank 0 stage 1: layers 10-11", "rank 1 stage 1: layers 12-13"):
        assert line in report, report


def run_describe(*overrides, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    return subprocess.run(
        [sys.executable, "-m", "pipeline.describe", *overrides],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )


def test_cli_prints_parameter_count_and_writes_nothing(tmp_path):
    result = run_describe("model=nemotron_h_8b", "parallel.tp=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = load_run_config(["model=nemotron_h_8b"])
    assert f"{sizes.param_counts(run.model)['total']:,}" in result.stdout, result.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "overrides, field",
    [
        (("model=nemotron_h_8b", "parallel.tp=3"), "parallel.tp=3"),
        (("model.hiden_size=4",), "hiden_size"),
        (("model=tiny_moe", "parallel.ep=3"), "parallel.ep=3"),
        (("model=tiny_moe", "model.moe.top_k=0"), "model.moe.top_k=0"),
    ],
)
def test_cli_bad_override_exits_2_with_one_line(tmp_path, overrides, field):
    result = run_describe(*overrides, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and field in lines[0], result.stderr


def test_cli_reports_total_and_active_parameters_of_an_moe_model(tmp_path):
    result = run_describe("model=nemotron3_nano_30b_a3b", "parallel.ep=8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = load_run_config(["model=nemotron3_nano_30b_a3b"])
    assert f"{sizes.param_counts(run.model)['total']:,}" in result.stdout, result.stdout
    assert f"active          {sizes.active_param_count(run.model):,}" in result.stdout, result.stdout
    assert "ep=8 etp=1: 16 experts per GPU" in result.stdout, result.stdout
