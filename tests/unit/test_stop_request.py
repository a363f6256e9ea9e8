"""Ctrl-C during a command: the first asks it to stop at its next safe point, a second one aborts.
(The save itself, in a real trainer process: tests/distributed/test_run_faults.py.)"""

import os
import signal
import time

import pytest

from pipeline.training.stop import StopRequest


@pytest.fixture
def stop():
    request = StopRequest()
    yield request
    request.close()


def test_first_ctrl_c_asks_for_a_save(stop):
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.signal == signal.SIGINT


def test_a_repeat_delivered_with_the_first_does_not_abort(stop):
    # A terminal's Ctrl-C reaches torchrun and every worker, and torchrun forwards it once more.
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.signal == signal.SIGINT


def test_second_ctrl_c_aborts_at_once(stop):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(StopRequest.REPEAT_S + 0.1)
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)


def test_handlers_are_given_back():
    before = signal.getsignal(signal.SIGINT)
    StopRequest().close()
    assert signal.getsignal(signal.SIGINT) is before
