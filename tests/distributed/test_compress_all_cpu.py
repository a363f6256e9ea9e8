"""`python -m pipeline.compress all` as a user runs it on a CPU machine, without precision=: it runs in
fp32 (like the dev run), `importance` prints what it scored, distillation runs at compress.lr_scale of
optim's rates, and each later step's `timing` record counts that step's start-up, not the process age.
"""

import sys

import pytest
import yaml

from tests.distributed.compress_runs import TINY, make_parent, records, run_cpu

LR, SCALE = 2e-3, 0.25


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress_all_cpu")
    parent = make_parent(root / "parent")
    shape = [o for o in TINY if not o.startswith("precision=")]
    proc = run_cpu([sys.executable, "-m", "pipeline.compress", "all", f"compress.parent={parent}",
                    f"run_dir={root / 'kd'}", *shape, "train.iters=2", "compress.target_params=0.95e6",
                    "compress.hidden_sizes=[64]", "compress.calibration_samples=4",
                    "compress.layer_calibration_samples=2", "compress.top_k=1", "compress.rank_iters=1",
                    f"compress.lr_scale={SCALE}", f"optim.lr={LR}", "optim.min_lr=0", "optim.warmup_iters=0",
                    "optim.schedule=constant"])
    return proc, root / "kd"


def test_cpu_defaults_to_fp32(compressed):
    proc, run_dir = compressed
    assert "no GPU: compressing in fp32" in proc.stderr
    for step_dir in (run_dir, run_dir / "compress" / "rank" / "c0"):
        config = yaml.safe_load((step_dir / "config.yaml").read_text())
        assert config["precision"]["name"] == "fp32", (step_dir, config["precision"])


def test_importance_prints_what_it_scored(compressed):
    proc, run_dir = compressed
    assert "importance of " in proc.stdout and "on 4 calibration sequences" in proc.stdout, proc.stdout
    assert "units: hidden 128 channels, FFN neurons 3 layers x 512" in proc.stdout, proc.stdout
    # tiny is M-M*-M-: seven layers, each listed with its symbol by the configured layer metric
    line = next(ln for ln in proc.stdout.splitlines() if "layers by logit_mse_increase" in ln)
    listed = line.split("least important first: ")[1].split("  ")
    assert len(listed) == 7 and {entry.split()[0] for entry in listed} == {f"{i}{c}" for i, c in enumerate("M-M*-M-")}
    assert f"scores -> {run_dir / 'compress' / 'scores'}" in proc.stdout


def test_distillation_runs_at_lr_scale_of_optim(compressed):
    _, run_dir = compressed
    for step_dir in (run_dir, run_dir / "compress" / "rank" / "c0"):
        rates = [r["lr"] for r in records(step_dir, "train")]
        assert rates and rates == pytest.approx([LR * SCALE] * len(rates)), (step_dir, rates)


def test_later_steps_time_their_own_start_up(compressed):
    _, run_dir = compressed
    files = run_dir / "compress"
    # The run began when its step did: after what the step before it wrote (process age would put
    # the start before importance).
    for step_dir, written_before in ((files / "rank" / "c0", files / "candidates.json"),
                                     (run_dir, files / "best.json")):
        (timing,) = [r for r in records(step_dir, "timing") if "startup_s" in r]
        began = timing["time"] - timing["first_step_s"] - timing["startup_s"]
        assert began >= written_before.stat().st_mtime, (step_dir, began, written_before.stat().st_mtime)
