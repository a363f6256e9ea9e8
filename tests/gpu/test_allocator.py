"""GPU: train.expandable_segments (default true) puts the run's memory in PyTorch's expandable
segments, and false leaves the allocator as PYTORCH_ALLOC_CONF says. Each run is a fresh process,
so the allocator has not been touched before the trainer starts. Skipped without CUDA.

    python -m pytest tests/gpu/test_allocator.py -s
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("default_corpus"),
]

REPO = Path(__file__).resolve().parents[2]
TRAIN_AND_REPORT = """
import json, sys, torch
from pipeline.config import load_run_config
from pipeline.training.loop import train
train(load_run_config(sys.argv[1:]))
segments = torch.cuda.memory_snapshot()
print(json.dumps({"segments": len(segments), "expandable": sum(s["is_expandable"] for s in segments)}))
"""


def _segments(run_dir: Path, *overrides: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    proc = subprocess.run(
        [sys.executable, "-c", TRAIN_AND_REPORT, "precision=bf16", "train.iters=3", "train.seq_length=512",
         "train.eval_interval=0", "checkpoint.save_interval=0", "checkpoint.save_at_end=false",
         f"run_dir={run_dir}", *overrides],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("enabled", [True, False])
def test_expandable_segments_option_sets_the_allocator(tmp_path, enabled):
    found = _segments(tmp_path / "run", f"train.expandable_segments={str(enabled).lower()}")
    print(f"\ntrain.expandable_segments={enabled}: {found['expandable']} of {found['segments']} segments expandable")
    assert found["segments"] > 0, found
    if enabled:
        assert found["expandable"] == found["segments"], f"some segments are not expandable: {found}"
    else:
        assert found["expandable"] == 0, f"expandable segments without the option: {found}"
