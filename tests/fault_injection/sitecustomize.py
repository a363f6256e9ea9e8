"""Fault injection for tests: on PYTHONPATH (through `tests.fault_injection.fault_env`), every Python
process of a test run, torchrun's workers and their forked checkpoint writers included, patches the
checkpoint writer at startup so that a save fails at an exact point, or sends itself a stop signal at
an exact point of a command. Nothing in `pipeline/` knows about it.

PIPELINE_TEST_FAULT=<fault>@<step dir name>, e.g. `disk-full@step_0000010`:
- `disk-full`: rank 0's commit of that save fails as a full disk does;
- `checkpoint-before-commit`: the process is killed after meta.json is written, before COMPLETE;
- `disk-full-while-writing`: the file writer fails as a full disk does;
- `trainer-killed-while-writing`: the background writer kills its trainer, then writes on slowly
  (it must end with its trainer, not finish).

PIPELINE_TEST_FAULT=<signal point>@<SIGNAL>:<n>, e.g. `signal-at-train-step@SIGTERM:2`: the process
sends itself SIGNAL during the n-th call of
- `signal-at-forward`: an importance calibration forward (`compress importance`);
- `signal-in-search`: the candidate search (`compress search`);
- `signal-at-train-step`: a training step (pretraining, and the distillations of `rank` and `distill`).

PIPELINE_TEST_FAULT=preprocess-killed-after-shards@<n>: `python -m pipeline.data preprocess` kills
itself (SIGKILL: no cleanup runs, as with an external kill) once it has finished n shards this run.
"""

import errno
import os
import signal
import time

_FAULT, _, _WHERE = os.environ.get("PIPELINE_TEST_FAULT", "").partition("@")
_saving = {"step_dir": None}


def _disk_full() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _install() -> None:
    from pipeline.checkpoint import writer

    save, make_visible = writer.CheckpointWriter.save, writer.CheckpointWriter._make_visible
    mark_complete, write_files = writer._mark_complete, writer._write_files

    def recording_save(self, step, *args, **kwargs):
        _saving["step_dir"] = writer.step_dir_name(step)  # a forked writer inherits it
        return save(self, step, *args, **kwargs)

    def failing_make_visible(self, pending, *args):
        if _FAULT == "disk-full" and pending.final.name == _WHERE:
            raise _disk_full()
        return make_visible(self, pending, *args)

    def killed_mark_complete(tmp):
        if _FAULT == "checkpoint-before-commit" and tmp.name == f"{writer.TMP_PREFIX}{_WHERE}":
            os.kill(os.getpid(), signal.SIGKILL)
        mark_complete(tmp)

    def faulty_write_files(write, written, trainer, *args):
        if _saving["step_dir"] == _WHERE and _FAULT == "disk-full-while-writing":
            def write(*_):
                raise _disk_full()
        if _saving["step_dir"] == _WHERE and _FAULT == "trainer-killed-while-writing" and trainer is not None:
            def write(*_):
                os.kill(trainer, signal.SIGKILL)
                time.sleep(60)
        return write_files(write, written, trainer, *args)

    writer.CheckpointWriter.save = recording_save
    writer.CheckpointWriter._make_visible = failing_make_visible
    writer._mark_complete = killed_mark_complete
    writer._write_files = faulty_write_files


def _signal_at(module, name: str) -> None:
    """Wrap module.name to send this process the signal of _WHERE during its n-th call."""
    signame, _, n = _WHERE.partition(":")
    calls = {"n": 0}
    original = getattr(module, name)

    def signalling(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == int(n or 1):
            os.kill(os.getpid(), getattr(signal, signame))
        return original(*args, **kwargs)

    setattr(module, name, signalling)


def _install_signal() -> None:
    if _FAULT == "signal-at-forward":
        from pipeline.compress import importance
        _signal_at(importance, "_run_forward")
    elif _FAULT == "signal-in-search":
        from pipeline.compress import search
        _signal_at(search, "search_candidates")
    else:
        from pipeline.training import loop
        _signal_at(loop, "train_step")


def _install_preprocess_kill() -> None:
    from pipeline.data import preprocess

    init, add = preprocess._Output.__init__, preprocess._Output.add

    def counting_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.resumed_with = len(self.finished)

    def killing_add(self, shard, last, result):
        add(self, shard, last, result)
        if last and len(self.finished) - self.resumed_with >= int(_WHERE):
            os.kill(os.getpid(), signal.SIGKILL)

    preprocess._Output.__init__, preprocess._Output.add = counting_init, killing_add


if _FAULT.startswith("signal-"):
    _install_signal()
elif _FAULT == "preprocess-killed-after-shards":
    _install_preprocess_kill()
elif _FAULT:
    _install()
