"""A file system that refuses a write outside the checkpoint writer (metrics, the run lock, the run dir)
gives one line `error: ...` (exit 2) and leaves no partial line in metrics.jsonl; a partial last line
left by an interrupted write is removed when the next run opens it. Faults are injected here, in-process
(/dev/full refuses every write with ENOSPC); a full trainer on /dev/full: tests/distributed/test_run_faults.py."""

import errno
import json
import os
from pathlib import Path

import pytest

from pipeline import metrics
from pipeline.cli import exit_on_user_error
from pipeline.errors import StorageError
from pipeline.metrics import LoggingConfig, MetricsLogger
from pipeline.training.run_lock import run_dir_owner


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def one_line(error: BaseException) -> str:
    assert "\n" not in str(error), str(error)
    return str(error)


def test_a_metrics_line_the_disk_refuses_half_of_is_cut_back(tmp_path, monkeypatch):
    log = MetricsLogger(LoggingConfig(), str(tmp_path), 0, "run")
    log.log(1, {"loss": 1.0})
    real_write, calls = os.write, []

    def half_then_full(fd, data):  # a nearly full disk: a short write, then ENOSPC
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(metrics.os, "write", half_then_full)
    with pytest.raises(StorageError) as info:
        log.log(2, {"loss": 2.0})
    assert "disk full" in one_line(info.value) and "metrics" in str(info.value)
    assert len(calls) == 2, "the short write was not continued"
    assert [r["step"] for r in rows(tmp_path)] == [1]
    monkeypatch.setattr(metrics.os, "write", real_write)
    log.log(3, {"loss": 3.0})
    log.close()
    assert [r["step"] for r in rows(tmp_path)] == [1, 3]


def test_a_partial_last_line_is_removed_when_the_next_run_opens_the_log(tmp_path, capsys):
    whole = json.dumps({"step": 1, "kind": "train", "loss": 1.0}) + "\n"
    (tmp_path / "metrics.jsonl").write_text(whole + '{"step": 2, "kind": "tr')
    log = MetricsLogger(LoggingConfig(), str(tmp_path), 0, "run")
    log.log(2, {"loss": 2.0})
    log.close()
    assert [r["step"] for r in rows(tmp_path)] == [1, 2]
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("WARNING:") and "partial line" in warning and "\n" not in warning, warning


def test_a_log_of_partial_lines_only_is_emptied(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "ki')
    MetricsLogger(LoggingConfig(), str(tmp_path), 0, "run").close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_metrics_on_a_full_disk_are_one_storage_error(tmp_path):
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    log = MetricsLogger(LoggingConfig(), str(tmp_path), 0, "run")
    with pytest.raises(StorageError) as info:
        log.log(1, {"loss": 1.0})
    assert "disk full" in one_line(info.value) and "metrics" in str(info.value)


def test_a_run_lock_the_disk_refuses_is_one_storage_error(tmp_path, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(StorageError) as info, run_dir_owner(tmp_path, 0):
        pass
    assert "disk full" in one_line(info.value) and "run lock" in str(info.value)


@pytest.mark.parametrize("code, expected", [(errno.ENOSPC, "disk full"), (errno.EROFS, "Read-only file system"),
                                            (errno.EDQUOT, "disk full"), (errno.EIO, "Input/output error")])
def test_a_storage_error_anywhere_exits_2_with_one_line(tmp_path, capsys, code, expected):
    # e.g. config.yaml or DONE written by the loop itself: no writer of its own catches it.
    with pytest.raises(SystemExit) as info, exit_on_user_error():
        raise OSError(code, os.strerror(code), str(tmp_path / "config.yaml"))
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert expected in err and "config.yaml" in err, err


def test_other_os_errors_stay_bugs(tmp_path):
    with pytest.raises(FileNotFoundError), exit_on_user_error():
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "x"))
