"""bench/recompute.py (GPU) runs as its docstring says, refuses bad arguments before any run, and its table
names the longest length per choice and the overhead against none."""

import subprocess
import sys
from pathlib import Path

from bench.recompute import table

REPO = Path(__file__).resolve().parents[2]


def test_runs_as_a_script_and_refuses_an_unknown_choice(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "recompute.py"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "--lengths" in proc.stdout, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "bench.recompute", "--choices", "none,partial"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        "error: unknown choice partial; choose from none, selective, full"), proc.stderr[-2000:]


def test_table_gives_longest_length_and_overhead_at_the_longest_common_one():
    rows = [
        {"choice": "none", "seq": 8192, "step_s": 1.0, "mem_gib": 60.0},
        {"choice": "none", "seq": 16384, "error": "torch.OutOfMemoryError: CUDA out of memory"},
        {"choice": "full", "seq": 8192, "step_s": 1.25, "mem_gib": 30.0},
        {"choice": "full", "seq": 16384, "step_s": 2.6, "mem_gib": 55.0},
    ]
    text = table("bench_1p5b", rows)
    assert "none: longest 8192; step 1.000x none's at 8192" in text
    assert "full: longest 16384; step 1.250x none's at 8192" in text
    assert "failed: torch.OutOfMemoryError" in text


def test_global_batch_reaches_each_rows_process(monkeypatch, tmp_path):
    """--global-batch sets the sequences per step of the process that measures each row (and of the
    tokens/s the table computes), not only of the parent's arithmetic."""
    import argparse
    import json

    from bench import recompute
    from bench import train as train_bench

    commands = []

    def fake_run(cmd, **kwargs):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, json.dumps({"step_s": 1.0, "mem_gib": 1.0}) + "\n", "")

    monkeypatch.setattr(train_bench.subprocess, "run", fake_run)
    monkeypatch.setattr(train_bench, "GLOBAL", 2)
    monkeypatch.setattr(train_bench, "SEQ", train_bench.SEQ)  # rows_for sets it per row
    args = argparse.Namespace(lengths=[16384], extra=[], run="bf16", steps=4, data=tmp_path, out=tmp_path)
    (row,) = recompute.rows_for(args, "bench_1p5b", "full")
    (cmd,) = commands
    assert cmd[cmd.index("--global-batch") + 1] == "2" and cmd[cmd.index("--seq") + 1] == "16384", cmd
    assert "--set=train.recompute=full" in cmd and row["seq"] == 16384
