"""The phased recipe and the long-context extension as docs/data.md runs them (shortened): build the
corpus components, train the three phases, then continue the result at 4x the sequence length."""

import json
import sys

from tests.distributed.training import run_cpu

SHORT = ["device=cpu", "precision=fp32", "train.global_batch_size=2", "train.micro_batch_size=1",
         "train.eval_interval=0", "logging.interval=1", "checkpoint.save_interval=0"]


def records(run_dir, kind):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["kind"] == kind]


def test_phased_recipe_then_long_context_extension(tmp_path):
    run_cpu([sys.executable, "-m", "pipeline.data", "corpus", "--phases", "--no-progress"])
    phased = tmp_path / "phased"
    run_cpu([sys.executable, "-m", "pipeline.train", "+experiment=phased_dev", *SHORT, "train.iters=3",
             "data.phases.1.start_step=1", "data.phases.2.start_step=2", f"run_dir={phased}"])
    assert [(r["phase"], r["seq_length"]) for r in records(phased, "phase")] == [
        ("broad", 256), ("quality", 256), ("long", 1024)]
    assert [r["phase"] for r in records(phased, "train")] == ["broad", "quality", "long"]

    extended = tmp_path / "extended"
    proc = run_cpu([sys.executable, "-m", "pipeline.train", "+experiment=long_context", *SHORT, "train.iters=1",
                    f"checkpoint.init_from={phased}", f"run_dir={extended}"])
    assert f"initialised weights from {phased}" in proc.stdout
    config = (extended / "config.yaml").read_text()
    assert "seq_length: 1024" in config and (extended / "DONE").exists()
