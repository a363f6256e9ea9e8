"""Writing checkpoints in the layout of `layout.py`, at once or in the background.

`CheckpointWriter` saves through megatron-core's asynchronous dist-checkpointing request
(`dist_checkpointing.save(..., async_sharded_save=True)`), run either at once or in the background:
the trainer plans the save and copies the tensors to host memory; a writer process forked from it
writes the files while training goes on; once every rank's writer has finished (the ranks agree by
an all-reduce), the finalize step writes torch's `.metadata` and rank 0 commits: meta.json,
run_config.yaml, COMPLETE, the rename, `latest`. A writer dies with its trainer (PR_SET_PDEATHSIG),
so a killed trainer leaves only the temporary directory, which the next start removes.

Writers report their results through a multiprocessing Manager queue whose server process
megatron-core 0.19.2 starts on first use and never stops (`filesystem_async.get_write_results_queue`):
a trainer killed with SIGKILL left it running (~0.5 GB each). `_results_queue_dies_with_trainer`
starts that server itself, set to die with the trainer; remove it when megatron's queue server stops
with its owner. The server also ignores the stop signals: torchrun passes a SIGTERM or Ctrl-C it gets
to each worker's whole process group, the server included, and a server that died then failed the
very save that signal asks for (ConnectionRefusedError, nothing saved).
"""

from __future__ import annotations

import dataclasses
import errno
import mmap
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import struct
import time
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import Callable

from pipeline.checkpoint.layout import (
    COMPLETE,
    FORMAT,
    LATEST,
    META,
    RUN_CONFIG,
    TMP_PREFIX,
    CheckpointMeta,
    fingerprint,
    latest_checkpoint,
    step_dir_name,
    step_dirs,
)
from pipeline.errors import CheckpointError, StorageError, find_cause
from pipeline.fs import atomic_write_text, fsync_dir, storage_error
from pipeline.processes import die_with_parent


def _record_files(ckpt_dir: Path) -> dict[str, list[int]]:
    return {p.name: fingerprint(p) for p in sorted(ckpt_dir.iterdir())
            if p.is_file() and p.name not in (META, COMPLETE)}


def _mark_complete(tmp: Path) -> None:
    """The last write into a save's temporary directory: from here on a restart may use it."""
    (tmp / COMPLETE).touch()
    fsync_dir(tmp)


def _serve_until_trainer_ends(trainer: int) -> None:
    """The results queue server's start: it dies with `trainer` and lives through the stop signals
    sent to the trainer's process group (the trainer saves after them, through this server)."""
    die_with_parent(trainer)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _results_queue_dies_with_trainer() -> None:
    """Give megatron-core's checkpoint writers a results queue whose server dies with this process
    (module docstring); a no-op once megatron has a queue."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    # "spawn", as megatron's own: the server must not inherit this process's threads and CUDA state.
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=_serve_until_trainer_ends, initargs=(os.getpid(),))
    filesystem_async._results_queue = _PickledQueue(manager.Queue())
    # The queue is a proxy: the manager object must live as long as the queue does (both module-level).
    filesystem_async._results_queue_manager = manager


class _PickledQueue:
    """The results queue as megatron-core uses it (`put`, `get_nowait`), carrying each item as pickled
    bytes. The server then never unpickles torch's WriteResult objects: doing so made the spawned
    server import torch and its checkpoint modules (seconds of CPU per trainer process) while the
    first save of every run waited for the reply to its `put`."""

    def __init__(self, queue):
        self._queue = queue

    def put(self, item) -> None:
        self._queue.put(pickle.dumps(item))

    def get_nowait(self):
        return pickle.loads(self._queue.get_nowait())


_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\]")


def _save_error(exc: BaseException, step_dir: Path, min_free: int) -> StorageError | None:
    """A StorageError for a save that failed for lack of space or permission, else None.

    An error raised in a writer reaches the finalize step as text ("Worker failure: [Errno 28] ..."):
    torch gathers each rank's failure pickled, which drops exception causes. torch.save's zip writer
    reports a failed write as "unexpected pos ..." and megatron-core's file writer only by the
    exception's type, both without the errno, so a file system left with less than `min_free` bytes
    free counts as full too."""
    found = find_cause(exc, lambda e: isinstance(e, OSError) and e.errno is not None)
    if found is None:
        described = find_cause(exc, lambda e: _ERRNO_TEXT.search(str(e)) is not None)
        if described is not None:
            code = int(_ERRNO_TEXT.search(str(described)).group(1))
            found = OSError(code, os.strerror(code))
    where = step_dir.parent
    if found is None:
        free = shutil.disk_usage(where).free if where.exists() else None
        if free is None or free >= min_free:
            return None
        found = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if found.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
        return None
    return storage_error(found, f"checkpoint {step_dir.name}", where)


PEER_TIMEOUT_S = 60
"""After an exception, how long ranks wait for each other before committing a save in flight. A rank
that failed alone would wait forever otherwise: its peers sit in a training collective."""


@dataclass
class SaveReport:
    """What one committed save cost (passed to `CheckpointWriter`'s on_commit)."""

    path: Path
    step: int
    stall_s: float
    """Seconds the caller was held up by this save: staging, waiting for the write and committing."""
    waited_s: float
    """The part of stall_s spent waiting for a background write to finish (the next save or the end
    of training came first)."""
    write_s: float
    """Seconds the slowest rank took to write its files."""
    bytes: int
    """Size of the checkpoint's files."""
    background: bool


@dataclass
class _Save:
    """A save from its start to its commit."""

    step: int
    final: Path
    tmp: Path
    background: bool
    min_free: int = 0
    written: mmap.mmap = field(default_factory=lambda: mmap.mmap(-1, 8))
    """This rank's write seconds (a double), set by the writer: shared memory, seen across the fork."""
    stall_s: float = 0.0
    waited_s: float = 0.0
    commit_s: float = 0.0
    write_s: float = 0.0
    bytes: int = 0

    def report(self) -> SaveReport:
        return SaveReport(self.final, self.step, self.stall_s, self.waited_s, self.write_s, self.bytes, self.background)


def _write_files(write, written: mmap.mmap, trainer: int | None, rank: int, buckets: list, results) -> None:
    """Write one rank's share of a save with megatron-core's writer and record how long it took.

    `write(rank, buckets, results)` is `FileSystemWriterAsync.write_preloaded_data_multithread`: it
    writes the staged tensors and reports the outcome on `results`, which the finalize step reads. A
    background writer (`trainer`: the trainer's pid) first ties its life to the trainer's and ignores
    the signals that ask the trainer to stop: it ends when its files are written, with its trainer, or
    when aborted (SIGKILL).
    """
    if trainer is not None:
        die_with_parent(trainer)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
    started = time.perf_counter()
    try:
        write(rank, buckets, results)
    except Exception as exc:  # noqa: BLE001 - reaches the finalize step as the writer's own failures do
        results.put(exc)
    struct.pack_into("d", written, 0, time.perf_counter() - started)


class CheckpointWriter:
    """Saves the checkpoints of one run (all ranks), atomically; with `background`, a process forked
    from each rank writes its files while the caller goes on. At most one save is in flight.

        writer = CheckpointWriter(root, keep=3, background=True, on_commit=report)
        writer.save(step, sharded_state, meta, run_config_yaml)  # returns once the state is staged
        writer.poll()                 # every step: commits the save once every rank's write finished
        writer.wait()                 # before the end: waits for the write, commits
        writer.settle_after_error()   # in an exception handler: commits if all ranks got there
        writer.abort()                # kills this rank's writer; the save stays uncommitted
        writer.close()                # after the last save

    All but `abort` and `close` are collective. `on_commit(SaveReport)` runs on every rank after each commit.
    """

    def __init__(self, checkpoints_dir: str | Path, keep: int | None = None, background: bool = False,
                 on_commit: Callable[[SaveReport], None] | None = None):
        import torch.distributed as dist

        self.root = Path(checkpoints_dir)
        self.keep = keep
        self.background = background
        self._on_commit = on_commit
        self._pending: _Save | None = None
        self._calls = self._peers = None
        _results_queue_dies_with_trainer()
        if background:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            # megatron's "temporal" caller forks a writer per save: it sees the staged tensors (on CPU
            # the live ones, frozen by copy-on-write) without another copy. Its persistent worker would
            # need them copied into shared memory first.
            self._calls = AsyncCallsQueue(persistent=False)
            if dist.get_world_size() > 1:
                self._peers = dist.new_group(backend="gloo", timeout=timedelta(seconds=PEER_TIMEOUT_S))

    def save(self, step: int, sharded_state: dict, meta: CheckpointMeta, run_config_yaml: str,
             prepared_s: float = 0.0) -> Path:
        """Save `sharded_state` as checkpoint `step`: written and committed before returning, or, in the
        background, staged and handed to a writer (a save still in flight is committed first).
        `prepared_s`, the caller's seconds spent building `sharded_state`, counts in the save's stall.

        A failed write (disk full, read-only) raises a one-line StorageError on every rank after
        removing the temporary directory; `latest` stays on the previous checkpoint."""
        import torch.distributed as dist
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint.api import CheckpointException

        self.wait()
        started = time.perf_counter()
        final = self.root / step_dir_name(step)
        save = _Save(step, final, self.root / f"{TMP_PREFIX}{final.name}", self.background)
        try:
            if dist.get_rank() == 0:
                previous = latest_checkpoint(self.root)
                save.min_free = sum(p.stat().st_size for p in previous.iterdir()) // 100 if previous else 0
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(save.tmp, ignore_errors=True)
                save.tmp.mkdir()
            dist.barrier()
            request = dist_checkpointing.save(sharded_state, str(save.tmp), async_sharded_save=True,
                                              async_strategy="mcore")
            if request.async_fn is not None:  # None: nothing to write on this rank
                trainer = os.getpid() if self.background else None
                request = request._replace(
                    async_fn=partial(_write_files, request.async_fn, save.written, trainer))
            request.add_finalize_fn(partial(self._commit, save, meta, run_config_yaml))
            if self.background:
                self._calls.schedule_async_request(request)
            else:
                request.execute_sync()
        except (Exception, CheckpointException) as exc:  # torch's CheckpointException is a BaseException
            self._discard(save, exc)
            raise
        save.stall_s = prepared_s + time.perf_counter() - started
        if self.background:
            self._pending = save
        elif self._on_commit is not None:
            self._on_commit(save.report())
        return final

    def poll(self) -> None:
        """Commit the save in flight if every rank's writer has finished; else return at once (one
        all-reduce while a save is in flight, none otherwise)."""
        self._finalize(blocking=False)

    def wait(self) -> None:
        """Wait until the save in flight is written on every rank, and commit it."""
        self._finalize(blocking=True)

    def settle_after_error(self) -> None:
        """After an exception: if every rank had one (they meet within PEER_TIMEOUT_S), wait for the
        save in flight and commit it; otherwise kill this rank's writer and raise CheckpointError
        (the save stays uncommitted, its temporary is removed at the next start)."""
        import torch.distributed as dist

        if self._pending is None:
            return
        if self._peers is not None:
            try:
                dist.barrier(group=self._peers)
            except RuntimeError:
                step = self._pending.step
                self.abort()
                raise CheckpointError(
                    f"checkpoint {step_dir_name(step)} was not committed: the other ranks did not stop within "
                    f"{PEER_TIMEOUT_S} s; a restart resumes from the previous one") from None
        self.wait()

    def abort(self) -> None:
        """Kill this rank's background writer now, without a word to the other ranks; the save in
        flight stays uncommitted (a second Ctrl-C)."""
        if self._calls is not None:
            for call in self._calls.async_calls:
                call.async_caller.close(abort=True)
            self._calls.async_calls.clear()
        self._pending = None

    def close(self) -> None:
        """Release what the writer holds across saves (the ranks' agreement group); call after the
        last save is committed or aborted."""
        import torch.distributed as dist

        if self._peers is not None:
            dist.destroy_process_group(self._peers)
            self._peers = None

    def _finalize(self, blocking: bool) -> None:
        from torch.distributed.checkpoint.api import CheckpointException

        save = self._pending
        if save is None:
            return
        started = time.perf_counter()
        try:
            done = self._calls.maybe_finalize_async_calls(blocking=blocking)
        except (Exception, CheckpointException) as exc:
            self._discard(save, exc)
            raise
        spent = time.perf_counter() - started
        save.stall_s += spent
        if blocking:
            save.waited_s += spent - save.commit_s
        if done:
            self._pending = None
            if self._on_commit is not None:
                self._on_commit(save.report())

    def _commit(self, save: _Save, meta: CheckpointMeta, run_config_yaml: str) -> None:
        """The last finalize step (all ranks, after every write finished and torch's `.metadata` is
        written): rank 0 makes the checkpoint visible; if that fails, every rank raises its error."""
        import torch.distributed as dist

        started = time.perf_counter()
        write_s = [0.0] * dist.get_world_size()
        dist.all_gather_object(write_s, struct.unpack_from("d", save.written)[0])
        save.write_s = max(write_s)
        outcome = [None, 0]
        if dist.get_rank() == 0:
            try:
                outcome[1] = self._make_visible(save, meta, run_config_yaml)
            except Exception as exc:  # noqa: BLE001 - raised on every rank below
                outcome[0] = exc
        dist.broadcast_object_list(outcome, src=0)
        save.commit_s = time.perf_counter() - started
        if outcome[0] is not None:
            raise outcome[0]
        save.bytes = outcome[1]

    def _make_visible(self, save: _Save, meta: CheckpointMeta, run_config_yaml: str) -> int:
        """Rank 0: meta.json, run_config.yaml, COMPLETE, the rename and `latest`, then pruning to `keep`;
        the checkpoint's size in bytes."""
        tmp, final = save.tmp, save.final
        meta = dataclasses.replace(meta, step=save.step, files=_record_files(tmp), format=FORMAT)
        (tmp / META).write_text(meta.to_json())
        (tmp / RUN_CONFIG).write_text(run_config_yaml)
        _mark_complete(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        atomic_write_text(self.root / LATEST, final.name)
        if self.keep:
            for old in step_dirs(self.root)[self.keep:]:
                shutil.rmtree(old, ignore_errors=True)
        return sum(size for size, _ in meta.files.values())

    def _discard(self, save: _Save, exc: BaseException) -> None:
        """Forget a failed save and remove its temporary (rank 0); a StorageError if it failed for lack
        of space or permission."""
        import torch.distributed as dist

        self._pending = None
        error = _save_error(exc, save.final, max(save.min_free, 1 << 20))  # before the cleanup frees space
        if dist.get_rank() == 0:
            shutil.rmtree(save.tmp, ignore_errors=True)
        if error is not None:
            raise error from exc


def save_checkpoint(
    checkpoints_dir: str | Path,
    step: int,
    sharded_state: dict,
    meta: CheckpointMeta,
    run_config_yaml: str,
    keep: int | None = None,
) -> Path:
    """Save on all ranks and commit atomically before returning (`CheckpointWriter.save`, no background).

    A failed write (disk full, read-only) raises a one-line StorageError after removing the temporary
    directory; `latest` stays on the previous checkpoint."""
    return CheckpointWriter(checkpoints_dir, keep).save(step, sharded_state, meta, run_config_yaml)


