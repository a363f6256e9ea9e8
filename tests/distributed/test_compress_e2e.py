"""Compression end to end on the embedded corpus (the worked example of docs/compression.md).

The dev-run parent (launch/local.sh, 2 CPU processes) is trained briefly; `python -m pipeline.compress
all compress=minipuzzle` scores it, searches students of about half its parameters, ranks, and
distils the best for a fixed token budget; the same student architecture is trained from scratch on
the same tokens. The distilled student must beat (a) itself before distillation and (b) the scratch
run on the validation loss, and export to Hugging Face with logit parity. The three losses and the
wall time are printed.
"""

import time

import pytest
import torch

from tests.distributed.compress_runs import records, run_cpu, torchrun

PARENT_ITERS = 100
KD_ITERS = 40
SHAPE = ["precision=fp32", "train.seq_length=128", "train.global_batch_size=8", "train.micro_batch_size=4",
         "train.eval_iters=4", "logging.interval=20", "checkpoint.save_interval=0"]
STUDENT = [f"train.iters={KD_ITERS}", f"train.eval_interval={KD_ITERS}", "optim.warmup_iters=5"]
HALF = ["compress.target_params=0.95e6", "compress.hidden_sizes=[64]", "compress.calibration_samples=16",
        "compress.layer_calibration_samples=8", "compress.top_k=1", "compress.rank_iters=2"]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress_e2e")
    started = time.perf_counter()
    run_cpu(["bash", "launch/local.sh", f"run_dir={root / 'parent'}", *SHAPE,
                 f"train.iters={PARENT_ITERS}", "train.eval_interval=0"])
    parent_s = time.perf_counter() - started
    torchrun(2, "pipeline.compress", "all", "compress=minipuzzle", f"compress.parent={root / 'parent'}",
             f"run_dir={root / 'kd'}", *SHAPE, *STUDENT, *HALF)
    kd_s = time.perf_counter() - started - parent_s
    candidate = root / "kd" / "compress" / "candidates" / "c0"
    (model_yaml,) = (candidate / "model").glob("*.yaml")
    torchrun(2, "pipeline.train", f"hydra.searchpath=[file://{candidate}]", f"model={model_yaml.stem}",
             f"run_dir={root / 'scratch'}", *SHAPE, *STUDENT)
    print(f"\ncompression e2e: parent {parent_s:.0f} s, compress all {kd_s:.0f} s, total "
          f"{time.perf_counter() - started:.0f} s")
    return root


def test_distilled_student_beats_pruned_and_scratch(e2e):
    kd = records(e2e / "kd", "valid")
    before, after = kd[0]["student_loss"], kd[-1]["student_loss"]
    scratch = records(e2e / "scratch", "valid")[-1]["loss"]
    print(f"\nvalidation loss: pruned before distillation {before:.3f}, distilled {after:.3f}, "
          f"same student from scratch {scratch:.3f} ({KD_ITERS} steps x 1024 tokens each)")
    assert kd[0]["step"] == 0 and kd[-1]["step"] == KD_ITERS
    assert after < before, f"distillation did not improve the pruned student ({before:.3f} -> {after:.3f})"
    assert after < scratch, f"distilled student {after:.3f} is not better than training from scratch {scratch:.3f}"


def test_student_has_about_half_the_parameters(e2e):
    from pipeline.checkpoint import resolve_checkpoint
    from pipeline.compress.distill import model_of
    from pipeline.model.sizes import param_counts

    parent = param_counts(model_of(resolve_checkpoint(e2e / "parent")))["total"]
    student = param_counts(model_of(resolve_checkpoint(e2e / "kd")))["total"]
    assert 0.4 <= student / parent <= 0.55, f"student has {student:,} of the parent's {parent:,} parameters"


def test_distilled_student_exports_with_logit_parity(e2e):
    from pipeline import checkpoint as ckpt
    from pipeline.compress.distill import model_of
    from pipeline.config import load_run_config
    from pipeline.distributed import distributed
    from pipeline.hf.export import export_checkpoint
    from pipeline.model.build import build_model
    from tests.distributed.worker_hf_checkpoint import pipeline_logits
    from tests.unit.test_hf_export import TOLERANCE, load_hf

    export_checkpoint(e2e / "kd", e2e / "hf", dtype="fp32")
    step_dir = ckpt.resolve_checkpoint(e2e / "kd")
    run = load_run_config(["precision=fp32"])
    run = type(run)(**{**run.__dict__, "model": model_of(step_dir)})
    tokens = torch.randint(0, run.model.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with distributed(run.parallel, None, "cpu") as world:
        (model,) = build_model(run.model, run.parallel, run.precision, run.train.seed, world.device)
        ckpt.load_model(step_dir, [model])
        ours = pipeline_logits(model, tokens)[..., : run.model.vocab_size]
    with torch.no_grad():
        theirs = load_hf(e2e / "hf")(tokens).logits
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOLERANCE, f"exported distilled student differs from the pipeline by {diff:.2e}"


def test_rank_table_and_pick_are_recorded_for_distill(e2e):
    import json

    from pipeline.checkpoint import resolve_checkpoint

    compress = e2e / "kd" / "compress"
    (row,) = json.loads((compress / "rank.json").read_text())
    best = json.loads((compress / "best.json").read_text())
    assert best["student"] == row["student"] == str(resolve_checkpoint(compress / "candidates" / "c0")), (best, row)
    valid = records(compress / "rank" / "c0", "valid")
    assert [v["step"] for v in valid] == [0, 2], "rank validates each candidate before and after its KD steps"
    assert (row["lm_loss_before"], row["lm_loss_after"], row["kl_after"]) == (
        valid[0]["student_loss"], valid[-1]["student_loss"], valid[-1]["kl"])
