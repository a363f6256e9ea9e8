"""Stop signals: SIGTERM, SIGUSR1 (Slurm's time-limit warning) and Ctrl-C ask a command to stop at its
next safe point, keeping what is complete, so that the same command started again resumes.

    with stop_requests(announce=rank == 0) as stop:    # one for the whole command, every rank
        for item in work:
            do(item)
            if stop.agreed(device):                      # collective: every rank stops together
                raise Stopped("in importance", stop)

A handler only records the signal: the work in progress is never cut in the middle of a write. The
trainer acts on it at a step's end (a checkpoint, docs/checkpoints.md); a compression step at its
next unit of work (pipeline/compress/progress.py). One request serves a whole command: a signal that
arrives between two steps of `compress all` is seen by the next one.
"""

import os
import signal
import sys
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
"""Slurm's preemption / time-limit warning, and Ctrl-C."""


class StopRequest:
    """Records a stop signal, acted on at a safe point; a second Ctrl-C aborts at once (nothing saved)."""

    REPEAT_S = 1.0
    """A Ctrl-C within this time of the first is the same one: a terminal sends it to torchrun and to
    every worker, and torchrun forwards it to the workers once more."""

    def __init__(self, announce: bool = True):
        self.signal: int | None = None
        self._announce = announce
        self._interrupted_at: float | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._interrupted_at is not None and now - self._interrupted_at > self.REPEAT_S:
                raise KeyboardInterrupt
            if self._interrupted_at is None:
                self._interrupted_at = now
                if self._announce:  # os.write: print() here could re-enter a print the handler interrupted
                    os.write(sys.stderr.fileno(), b"Ctrl-C: stopping at the next step's end, keeping what is "
                                                  b"complete (press Ctrl-C again to abort without saving)\n")
        self.signal = signum

    def agreed(self, device: torch.device) -> bool:
        """True on every rank if any rank was signalled (all ranks must stop together)."""
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def name(self) -> str:
        """The signal's name, for the message that says why the command stopped."""
        return signal.Signals(self.signal).name if self.signal else "a signal on another rank"

    def close(self) -> None:
        """Give the signals back to their previous handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


_current: StopRequest | None = None


@contextmanager
def stop_requests(announce: bool = True):
    """This process's StopRequest for the duration: a new one, or the one an enclosing command
    installed (`compress all` around the trainer), so that no signal falls between two owners."""
    global _current
    if _current is not None:
        yield _current
        return
    _current = StopRequest(announce)
    try:
        yield _current
    finally:
        _current.close()
        _current = None


class Stopped(Exception):
    """A command step stopped early on a stop signal, leaving only complete results (exit status 0:
    the same command resumes). Not a user error and not a bug."""

    def __init__(self, where: str, stop: StopRequest):
        """`where`: e.g. "in importance", "before rank"."""
        super().__init__(f"stopping {where} ({stop.name()}); run the same command with the same run_dir "
                         f"to resume")
