"""Distillation (pipeline/compress/distill.py) through the pretraining loop on CPU: the KD loss at
TP=2 equals TP=1, a resumed distillation continues bit-exactly, the teacher stays frozen, the
records carry the student's and the teacher's loss and the KL, and a student equal to its teacher
has zero KL."""

import pytest
import torch

from tests.distributed.compress_runs import TINY, make_parent, make_student, records
from tests.distributed.launch import REPO, torchrun

ITERS = 6


def test_kd_loss_with_vocabulary_split_over_tp2_equals_tp1():
    out = torchrun(REPO / "tests/distributed/worker_compress_kd_tp.py", 2)
    assert "kd tp ok" in out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    parent = make_parent(root / "parent")
    student = make_student(parent, root / "student", hidden=range(0, 128, 2), ffn={i: range(256) for i in (1, 4, 6)})
    return {"root": root, "parent": parent, "student": student}


def _distill(pair, run_dir, *overrides: str, iters: int = ITERS) -> int:
    from pipeline.compress.__main__ import main

    return main(["distill", *TINY, f"train.iters={iters}", f"compress.parent={pair['parent']}",
                 f"compress.student={pair['student']}", "compress.lm_weight=0.5", f"run_dir={run_dir}", *overrides])


@pytest.fixture(scope="module")
def straight(pair):
    """ITERS uninterrupted steps, the teacher's weights captured before and after."""
    from pipeline.compress import distill
    from pipeline.config import load_run_config
    from pipeline.training.loop import train

    run = load_run_config([*TINY, f"train.iters={ITERS}", f"compress.parent={pair['parent']}", "compress.lm_weight=0.5",
                           "train.eval_interval=3", f"run_dir={pair['root'] / 'straight'}"])
    student_run, teacher = distill.check_pair(run, distill.resolve_parent(run), pair["student"])
    made = {}

    def capture(*args):
        objective = distill.objective_factory(teacher, run.compress)(*args)
        made["objective"] = objective
        made["before"] = [p.detach().clone() for c in objective.teacher_chunks for p in c.parameters()]
        return objective

    train(student_run, objective=capture)
    return {"run_dir": pair["root"] / "straight", **made}


def test_distillation_resumes_bit_exactly(pair, straight, tmp_path):
    assert _distill(pair, tmp_path, f"train.exit_after_steps={ITERS // 2}") == 0
    assert not (tmp_path / "DONE").exists()
    assert _distill(pair, tmp_path) == 0
    assert (tmp_path / "DONE").exists()
    resumed = {r["step"]: (r["loss"], r["student_loss"], r["teacher_loss"], r["kl"])
               for r in records(tmp_path, "train")}
    reference = {r["step"]: (r["loss"], r["student_loss"], r["teacher_loss"], r["kl"])
                 for r in records(straight["run_dir"], "train")}
    assert resumed == reference, f"{ITERS // 2} steps + resume + {ITERS // 2} differs from {ITERS} straight"


def test_distillation_at_pp2_matches_one_process(pair, straight, tmp_path):
    """Teacher and student split over 2 pipeline stages (the teacher's logits cross to the student's
    last stage through its own forward-only schedule) give the single-process losses."""
    from tests.distributed.compress_runs import torchrun as run_module

    run_module(2, "pipeline.compress", "distill", *TINY, f"train.iters={ITERS}", "train.eval_interval=3",
               f"compress.parent={pair['parent']}", f"compress.student={pair['student']}", "compress.lm_weight=0.5",
               "parallel.pp=2", f"run_dir={tmp_path}")
    for kind in ("train", "valid"):
        ours, reference = records(tmp_path, kind), records(straight["run_dir"], kind)
        assert [r["step"] for r in ours] == [r["step"] for r in reference]
        for a, b in zip(ours, reference):
            for key in ("loss", "student_loss", "teacher_loss", "kl"):
                assert a[key] == pytest.approx(b[key], rel=1e-5), f"{kind} step {a['step']} {key}: {a[key]} vs {b[key]}"


def test_teacher_gets_no_gradients_and_keeps_its_weights(straight):
    params = [p for c in straight["objective"].teacher_chunks for p in c.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in params)
    changed = [i for i, (p, q) in enumerate(zip(params, straight["before"])) if not torch.equal(p, q)]
    assert not changed, f"{len(changed)} teacher tensors changed during distillation"


def test_records_carry_student_and_teacher_loss_and_kl(straight):
    for kind in ("train", "valid"):
        rows = records(straight["run_dir"], kind)
        assert rows, f"no {kind} records"
        for row in rows:
            assert {"loss", "student_loss", "teacher_loss", "kl"} <= row.keys(), row
    train_rows = records(straight["run_dir"], "train")
    # lm_weight=0.5: the optimised loss is KL + 0.5 * the student's cross-entropy.
    row = train_rows[-1]
    assert row["loss"] == pytest.approx(row["kl"] + 0.5 * row["student_loss"], rel=1e-5)


def test_student_equal_to_its_teacher_has_zero_kl_and_hidden_distance(pair, tmp_path):
    from pipeline.compress.__main__ import main

    identity = make_student(pair["parent"], pair["root"] / "identity")
    assert main(["distill", *TINY, "train.iters=1", "train.eval_interval=1", f"compress.parent={pair['parent']}",
                 f"compress.student={identity}", "compress.hidden_weight=0.5", f"run_dir={tmp_path}"]) == 0
    first = records(tmp_path, "valid")[0]
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["hidden_cos"] == pytest.approx(0.0, abs=1e-6)
    assert first["student_loss"] == pytest.approx(first["teacher_loss"], rel=1e-6)


def test_hidden_term_slices_the_teacher_to_the_kept_channels(pair, tmp_path):
    """The pruned student (64 of 128 hidden channels, its keep plan beside it) trains the hidden term."""
    assert _distill(pair, tmp_path, "compress.hidden_weight=0.5", iters=2) == 0
    rows = records(tmp_path, "train")
    assert rows and all(0 < r["hidden_cos"] < 2 for r in rows), rows
