"""The entry points are Hydra apps: each flag of docs/cli.md typed as a user would, in a subprocess."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def run(*args: str, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_help_lists_config_groups_and_their_presets(tmp_path):
    proc = run("-m", "pipeline.train", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    groups = dict(line.split(": ", 1) for line in proc.stdout.splitlines()
                  if line.startswith(("model: ", "precision: ")))
    assert {"tiny", "nemotron_h_8b", "nemotron_nano2_9b"} <= set(groups["model"].split(", ")), proc.stdout
    assert "fp8_tensorwise" in groups["precision"].split(", "), proc.stdout
    assert "python -m pipeline.train" in proc.stdout
    assert list(tmp_path.iterdir()) == [], "--help must write nothing"


def test_cfg_job_prints_the_composed_config_with_overrides():
    proc = run("-m", "pipeline.describe", "--cfg", "job", "model=nemotron_h_8b", "train.iters=7")
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert (cfg["model"]["name"], cfg["train"]["iters"]) == ("nemotron_h_8b", 7)
    assert "hydra" not in cfg


def test_cfg_hydra_shows_the_sweep_layout():
    proc = run("-m", "pipeline.train", "--cfg", "hydra")
    assert proc.returncode == 0, proc.stderr
    hydra = yaml.safe_load(proc.stdout)["hydra"]
    assert hydra["sweep"] == {"dir": "${run_dir}/multirun", "subdir": "${hydra.job.num}"}
    assert hydra["job"]["chdir"] is False and hydra["run"]["dir"] == "."


def test_info_shows_the_config_search_path():
    proc = run("-m", "pipeline.describe", "--info", "searchpath")
    assert proc.returncode == 0, proc.stderr
    assert f"file://{REPO / 'conf'}" in proc.stdout, proc.stdout


def test_bash_completion_offers_the_presets():
    # As installed by `eval "$(python pipeline/train.py -sc install=bash)"`; then <TAB> after `model=nemotron_h_`.
    line = "python pipeline/train.py model=nemotron_h_"
    script = f"""
        eval "$(python pipeline/train.py -sc install=bash)"
        COMP_LINE='{line}'; COMP_POINT=${{#COMP_LINE}}; COMP_WORDS=({line}); COMP_CWORD=2
        hydra_bash_completion
        printf '%s\\n' "${{COMPREPLY[@]}}"
    """
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    assert Path(shutil.which("python", path=path)).resolve() == Path(sys.executable).resolve()
    env = dict(os.environ, PATH=path, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    offered = set(proc.stdout.split())
    assert {"model=nemotron_h_4b", "model=nemotron_h_8b", "model=nemotron_h_56b"} <= offered, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small tokenizer and dataset, built as the embedded corpus is (first few files only)."""
    from pipeline.data.corpus import build

    out = tmp_path_factory.mktemp("corpus")
    build(str(out), max_files=5, vocab_size=400, workers=1, progress=False)
    return out


def test_lr_sweep_trains_each_job_in_its_own_run_dir(tmp_path, corpus):
    proc = run(
        "-m", "pipeline.train", "-m", "optim.lr=1e-3,2e-3", "optim.min_lr=1e-4", "train.iters=2",
        "train.seq_length=64", "train.global_batch_size=2", "train.micro_batch_size=1", "train.eval_interval=0",
        "checkpoint.save_interval=0", "precision=fp32", "device=cpu", f"run_dir={tmp_path}", "data.split='80,20,0'",
        f"data.tokenizer={corpus / 'tokenizer'}", f"data.paths=[{corpus / 'corpus_text_document'}]",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, lr in (("0", 1e-3), ("1", 2e-3)):
        run_dir = tmp_path / "multirun" / job
        assert (run_dir / "DONE").exists(), f"job {job} did not finish in {run_dir}"
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == lr


def test_sweep_with_a_bad_point_fails_before_any_job_runs(tmp_path):
    proc = run("-m", "pipeline.describe", "-m", "model=nemotron_h_8b", "parallel.tp=1,3", f"run_dir={tmp_path}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().startswith("error: ") and "parallel.tp=3" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert list(tmp_path.iterdir()) == [], "no job may start when one point of the sweep is invalid"
