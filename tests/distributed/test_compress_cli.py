"""`python -m pipeline.compress` refuses bad requests before any work: exit status 2, one line
naming the problem and the fix, no run directory written."""

import shutil

import pytest

from tests.distributed.compress_runs import TINY, make_parent, make_student


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    return make_parent(tmp_path_factory.mktemp("cli") / "parent")


def _fails(capsys, tmp_path, *argv: str) -> str:
    from pipeline.compress.__main__ import main

    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *TINY, "train.iters=1", f"run_dir={run_dir}"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    # Ours is the last line (torch may warn on its first import) and the only error line.
    assert [line for line in err.splitlines() if line.startswith("error")] == [err.splitlines()[-1]], err
    assert not run_dir.exists(), "a refused request must not write a run directory"
    return err.splitlines()[-1]


def test_missing_parent(capsys, tmp_path):
    err = _fails(capsys, tmp_path, "distill", f"compress.parent={tmp_path / 'nothing'}")
    assert "does not exist" in err


def test_unset_parent(capsys, tmp_path):
    assert "compress.parent is not set" in _fails(capsys, tmp_path, "rank")


def test_incomplete_parent(capsys, tmp_path, parent):
    broken = tmp_path / "broken"
    shutil.copytree(parent, broken)
    for marker in (broken / "checkpoints").glob("step_*/COMPLETE"):
        marker.unlink()
    err = _fails(capsys, tmp_path, "distill", f"compress.parent={broken}")
    assert "no complete checkpoint" in err


def test_teacher_student_vocabulary_mismatch(capsys, tmp_path, parent):
    other = make_parent(tmp_path / "other_vocab", "model.vocab_size=4224")
    student = make_student(other, tmp_path / "student")
    err = _fails(capsys, tmp_path, "distill", f"compress.parent={parent}", f"compress.student={student}")
    assert "vocab_size=4096" in err and "4224" in err


def test_hidden_term_without_the_students_keep_plan(capsys, tmp_path, parent):
    student = make_student(parent, tmp_path / "student", hidden=range(64))
    (tmp_path / "student" / "keep_plan.json").unlink()
    err = _fails(capsys, tmp_path, "distill", f"compress.parent={parent}", f"compress.student={student}",
                 "compress.hidden_weight=1")
    assert "keep_plan.json" in err and "compress.hidden_weight=0" in err


def test_distill_without_a_student(capsys, tmp_path, parent):
    err = _fails(capsys, tmp_path, "distill", f"compress.parent={parent}")
    assert "compress.student" in err and "pipeline.compress rank" in err


def test_unknown_step(capsys):
    from pipeline.compress.__main__ import main

    assert main(["prune"]) == 2
    assert "unknown step 'prune'" in capsys.readouterr().err


def test_impossible_budget_fails_before_importance(capsys, tmp_path, parent):
    err = _fails(capsys, tmp_path, "all", f"compress.parent={parent}", "compress.target_params=1000")
    assert "compress.target_params" in err
