"""StartupTiming's `startup_s`: the first run of a process counts from the process start (imports
included), or from `start_clock()` when a multi-step command marked its step; a later run of the same
process counts from when `train` was entered, never from the process start."""

import time

import psutil
import pytest

from pipeline import throughput
from pipeline.throughput import StartupTiming, start_clock


class Log:
    def __init__(self):
        self.records = []

    def log(self, step, record, kind="train"):
        self.records.append((kind, record))


def _startup(entered: float) -> float:
    log = Log()
    StartupTiming(log, entered).step_done(0.1, 1)
    ((kind, record),) = log.records
    assert kind == "timing"
    return record["startup_s"]


@pytest.fixture
def fresh_process(monkeypatch):
    monkeypatch.setattr(StartupTiming, "_runs", 0)
    monkeypatch.setattr(throughput, "_origin", None)


def test_first_run_counts_from_the_process_start(fresh_process):
    age = time.time() - psutil.Process().create_time()
    assert _startup(entered=time.time()) >= age


def test_later_run_counts_from_entering_train(fresh_process):
    _startup(entered=time.time())
    assert _startup(entered=time.time() - 2.0) == pytest.approx(2.0, abs=0.5)


def test_a_marked_step_counts_from_its_mark(fresh_process):
    start_clock()
    throughput._origin -= 3.0  # the step began 3 s ago
    assert _startup(entered=time.time()) == pytest.approx(3.0, abs=0.5)
