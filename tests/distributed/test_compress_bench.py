"""bench/compress.py runs on CPU with the tiny model (its smoke test): one table row per precision
with the time to score, the pruned student's loss before and after distillation and both
throughputs, and the modelopt line."""

import json
import sys

from tests.distributed.compress_runs import run_cpu


def test_compress_benchmark_smoke_on_cpu(tmp_path):
    proc = run_cpu([sys.executable, "bench/compress.py", "--tiny", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "bench_compress.json").read_text())
    row = result["runs"]["fp32"]
    assert row["score_s"] > 0 and row["kd_tokens_per_s"] > 0 and row["plain_tokens_per_s"] > 0, row
    assert row["loss_after"] < row["loss_before"], row
    assert "KD tok/s" in proc.stdout and result["modelopt"] in proc.stdout
