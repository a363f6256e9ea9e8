"""The only module that knows the on-disk checkpoint layout, and the one that writes checkpoints.

    run_dir/checkpoints/
      latest                 name of the newest complete checkpoint ("step_0000100")
      step_0000100/          megatron-core dist_checkpointing (torch_dist) + meta.json,
                             run_config.yaml and COMPLETE (written last)
      .tmp-step_0000200/     a save in progress; renamed when complete

A save is visible only after the atomic rename of a directory that already holds COMPLETE, and
`latest` is replaced atomically after that, so a process killed at any moment leaves the previous
checkpoint usable. Model tensors are stored under megatron-core's global sharded keys (layer index
global, Mamba fused tensors split per component), so any TP/PP/DP layout can load them.

`CheckpointWriter` saves through megatron-core's asynchronous dist-checkpointing request
(`dist_checkpointing.save(..., async_sharded_save=True)`), run either at once or in the background:
the trainer plans the save and copies the tensors to host memory; a writer process forked from it
writes the files while training goes on; once every rank's writer has finished (the ranks agree by
an all-reduce), the finalize step writes torch's `.metadata` and rank 0 commits as above. A writer
dies with its trainer (PR_SET_PDEATHSIG), so a killed trainer leaves only the temporary directory,
which the next start removes.

meta.json (`CheckpointMeta`) records each file's size and a sampled checksum; `find_resumable`
verifies them before a resume and skips a damaged checkpoint only with a warning naming it. Reads
go through `megatron_patches.safe_checkpoint_loading` (docs/checkpoints.md: a checkpoint is code).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import mmap
import os
import re
import shutil
import signal
import struct
import time
import zlib
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from pipeline.errors import CheckpointError, StorageError, UnsafeCheckpointError
from pipeline.fs import atomic_write_text, fsync_dir, storage_error
from pipeline.processes import die_with_parent

if TYPE_CHECKING:
    import torch

# torch is imported where used: composing a run config imports CheckpointConfig from here and should
# not pay for importing torch and its checkpoint package (~1.8 s).


@dataclass
class CheckpointConfig:
    """When to save and what to keep; restarting with the same run_dir resumes from the latest."""

    save_interval: int = 100
    """Save every N steps (also at the end and on SIGTERM/SIGUSR1); 0 = only those."""
    save_at_end: bool = True
    """Save when train.iters is reached (benchmarks turn it off; stop signals still save)."""
    keep_last: int = 3
    """Keep the newest K checkpoints (0 keeps all)."""
    resume: bool = True
    """Resume from run_dir/checkpoints/latest when it exists."""
    init_from: Optional[str] = None
    """Start a new run from these weights (a checkpoint, e.g. an imported HF model): weights only."""
    async_save: bool = True
    """Write checkpoints in the background: training stops only to copy the state to host memory
    (and for the commit) while a forked process writes the files. On by default: the saved state
    and the atomic commit are the same as a synchronous save's, so it changes no numbers, and it
    works on CPU as on GPU; it costs host memory for one copy of each rank's state while a save is
    in flight. false: training waits until the files are written."""


FORMAT = 2
"""meta.json layout version: 1 had no file records; 2 records each file's size and sampled checksum."""
LATEST = "latest"
COMPLETE = "COMPLETE"
META = "meta.json"
RUN_CONFIG = "run_config.yaml"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
DCP_METADATA = ".metadata"
# Model fields a checkpoint's weights depend on: resuming with other values is refused.
SHAPE_FIELDS = (
    "pattern", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "mamba_num_heads", "mamba_head_dim", "mamba_num_groups", "mamba_state_dim",
    "mamba_conv_kernel", "vocab_size", "make_vocab_size_divisible_by",
)
SAMPLE_BYTES = 1 << 20
"""Bytes read at the start, middle and end of each file for its checksum: a few MiB per checkpoint
file whatever its size, so verifying a 100 GB checkpoint costs seconds, and still catches truncation
(the size), a file overwritten or zeroed (the samples) and a file swapped for another."""


@dataclass
class CheckpointMeta:
    """A checkpoint's meta.json: what it holds and what loading it needs. The only reader and writer."""

    step: int
    model: dict
    """The ModelConfig fields the weights were made with (`dataclasses.asdict`)."""
    parallel: dict = field(default_factory=dict)
    """The layout that wrote it: tp, pp, dp, world_size (RNG states are per rank of that layout)."""
    tokenizer: str | None = None
    consumed_samples: int = 0
    weights_only: bool = False
    """True for checkpoints without optimizer/RNG/train state (an HF import): start from them with
    checkpoint.init_from, never resume them."""
    source: str | None = None
    """Where the weights came from (an HF directory for imports, the parent for a pruned student)."""
    pruned_from: dict | None = None
    """A pruned student's parent: its checkpoint, step and model config."""
    files: dict[str, list[int]] | None = None
    """File name -> [size in bytes, sampled CRC32], recorded at save; None in format-1 checkpoints."""
    format: int = FORMAT

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def read(cls, ckpt_dir: str | Path) -> "CheckpointMeta":
        """The meta.json of `ckpt_dir`; CheckpointError naming the file if missing or unreadable."""
        path = Path(ckpt_dir) / META
        try:
            fields = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing; the checkpoint is damaged or was not written by this pipeline") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {e}); the checkpoint is damaged") from None
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(fields, dict) or not {"step", "model"} <= fields.keys():
            raise CheckpointError(f"{path} lacks step/model; the checkpoint is damaged")
        if fields.get("format", 1) > FORMAT:
            raise CheckpointError(f"{path} has format {fields['format']}, newer than this pipeline's {FORMAT}; update the pipeline")
        return cls(**{k: v for k, v in fields.items() if k in names})


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def _fault_point(name: str, where: str) -> None:
    """Act here when PIPELINE_FAULT is `name` or `name@where`, so tests hit a save at an exact point:
    "checkpoint-before-commit" kills the process; "disk-full" (rank 0's commit) and
    "disk-full-while-writing" (the file writer) fail as a full disk does; "trainer-killed-while-writing"
    has the background writer kill its trainer, then write on slowly."""
    if os.environ.get("PIPELINE_FAULT") not in (name, f"{name}@{where}"):
        return
    if name.startswith("disk-full"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if name == "trainer-killed-while-writing":
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(60)  # a long write: it must end with its trainer, not finish
        return
    os.kill(os.getpid(), signal.SIGKILL)


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / META).is_file()


def fingerprint(path: Path) -> list[int]:
    """[size, CRC32 of up to SAMPLE_BYTES at the start, middle and end] of a file."""
    size = path.stat().st_size
    crc = 0
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)}):
            f.seek(offset)
            crc = zlib.crc32(f.read(SAMPLE_BYTES), crc)
    return [size, crc]


def _record_files(ckpt_dir: Path) -> dict[str, list[int]]:
    return {p.name: fingerprint(p) for p in sorted(ckpt_dir.iterdir()) if p.is_file() and p.name not in (META, COMPLETE)}


def verify_checkpoint(ckpt_dir: str | Path) -> CheckpointMeta:
    """The checkpoint's meta after checking that it is whole: COMPLETE, a readable meta.json, the
    torch metadata, and every file with the size and checksum recorded at save. CheckpointError
    saying what is wrong otherwise."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / COMPLETE).is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir} has no {COMPLETE} marker (its save did not finish)")
    meta = CheckpointMeta.read(ckpt_dir)
    if not (ckpt_dir / DCP_METADATA).is_file():
        raise CheckpointError(f"{ckpt_dir / DCP_METADATA} is missing; the checkpoint is damaged")
    for name, (size, crc) in (meta.files or {}).items():
        path = ckpt_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; the checkpoint is damaged")
        found = fingerprint(path)
        if found[0] != size:
            raise CheckpointError(f"{path} has {found[0]} bytes, {size} were saved; the file is truncated or damaged")
        if found[1] != crc:
            raise CheckpointError(f"{path} does not match its checksum from the save; the file is damaged")
    return meta


def _step_dirs(root: Path) -> list[Path]:
    """Step directories under `root`, newest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob(f"{PREFIX}*") if p.is_dir()), reverse=True)


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under `checkpoints_dir` (follows `latest`), or None."""
    root = Path(checkpoints_dir)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text(errors="replace").strip()
        if candidate.name.startswith(PREFIX) and _is_complete(candidate):
            return candidate
    # A missing or stale pointer (e.g. killed between rename and pointer update): scan instead.
    done = [p for p in _step_dirs(root) if _is_complete(p)]
    return done[0] if done else None


def find_resumable(checkpoints_dir: str | Path, warn: Callable[[str], None]) -> Path | None:
    """The newest intact checkpoint under `checkpoints_dir`, verified (`verify_checkpoint`); None if
    there is none yet. Every newer damaged one, and a damaged `latest` pointer, is reported through
    `warn` in one line naming it; if checkpoints exist but none is intact: CheckpointError."""
    root = Path(checkpoints_dir)
    pointer = root / LATEST
    if pointer.exists():
        name = pointer.read_text(errors="replace").strip()
        if not (name.startswith(PREFIX) and (root / name).is_dir()):
            warn(f"WARNING: {pointer} is damaged (it names {name[:40]!r}, not a checkpoint here); "
                 f"using the newest intact checkpoint instead")
    damaged = []
    for candidate in _step_dirs(root):
        try:
            verify_checkpoint(candidate)
        except CheckpointError as e:
            damaged.append(candidate)
            warn(f"WARNING: damaged checkpoint {candidate} skipped: {e}")
            continue
        if damaged:
            warn(f"WARNING: resuming from {candidate.name}, an older checkpoint than the damaged "
                 f"{damaged[0].name}; the steps in between are trained again")
        return candidate
    if damaged:
        raise CheckpointError(
            f"no intact checkpoint in {root} ({len(damaged)} damaged, newest {damaged[0].name}); restore them, "
            f"or move {root} away to start from scratch"
        )
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory from a run dir, a checkpoints dir or a step dir; CheckpointError if none."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist; give a run dir, its checkpoints/ or a step dir")
    if (path / META).exists() or path.name.startswith(PREFIX):
        if not _is_complete(path):
            raise CheckpointError(
                f"checkpoint {path} is incomplete (no {COMPLETE} marker): its save was interrupted; "
                f"use an earlier step"
            )
        return path
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise CheckpointError(f"no complete checkpoint under {path}; train first or give a step directory")


def read_meta(ckpt_dir: str | Path) -> CheckpointMeta:
    """The checkpoint's meta; CheckpointError if the checkpoint is incomplete or the meta unreadable."""
    ckpt_dir = Path(ckpt_dir)
    if not _is_complete(ckpt_dir):
        raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete or missing (no {COMPLETE}/{META})")
    return CheckpointMeta.read(ckpt_dir)


def check_compatible(meta: CheckpointMeta, model_fields: dict, ckpt_dir: Path) -> None:
    """Refuse to resume when the model shape differs from the checkpoint's."""
    saved = meta.model
    diff = [f for f in SHAPE_FIELDS if saved.get(f) != model_fields.get(f)]
    if diff:
        f = diff[0]
        raise CheckpointError(
            f"model.{f}={model_fields.get(f)!r} but checkpoint {ckpt_dir} was trained with "
            f"{saved.get(f)!r}; use model.{f}={saved.get(f)!r} or a new run_dir"
        )


def remove_stale_temporaries(checkpoints_dir: str | Path) -> None:
    """Delete saves that were interrupted (rank 0, at start)."""
    root = Path(checkpoints_dir)
    if root.is_dir():
        for tmp in root.glob(f"{TMP_PREFIX}{PREFIX}*"):
            shutil.rmtree(tmp, ignore_errors=True)


def _find_cause(exc: BaseException, wanted) -> BaseException | None:
    """The first exception behind `exc` for which `wanted` is true, through exception chains and the
    per-rank failures of torch's CheckpointException (which wraps everything a save or load raises)."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if wanted(e):
            return e
        todo += [e.__cause__, e.__context__]
        todo += [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]
    return None


_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\]")


def _save_error(exc: BaseException, step_dir: Path, min_free: int) -> StorageError | None:
    """A StorageError for a save that failed for lack of space or permission, else None.

    An error raised in a writer reaches the finalize step as text ("Worker failure: [Errno 28] ..."):
    torch gathers each rank's failure pickled, which drops exception causes. torch.save's zip writer
    reports a failed write as "unexpected pos ..." and megatron-core's file writer only by the
    exception's type, both without the errno, so a file system left with less than `min_free` bytes
    free counts as full too."""
    found = _find_cause(exc, lambda e: isinstance(e, OSError) and e.errno is not None)
    if found is None:
        described = _find_cause(exc, lambda e: _ERRNO_TEXT.search(str(e)) is not None)
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


def _write_files(write, written: mmap.mmap, trainer: int | None, where: str, rank: int, buckets: list, results) -> None:
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
        _fault_point("trainer-killed-while-writing", where)
    started = time.perf_counter()
    try:
        _fault_point("disk-full-while-writing", where)
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
        from pipeline.megatron_patches import write_results_queue_dies_with_trainer

        self._pending: _Save | None = None
        self._calls = self._peers = None
        write_results_queue_dies_with_trainer()
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
                    async_fn=partial(_write_files, request.async_fn, save.written, trainer, final.name))
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
        _fault_point("disk-full", final.name)
        meta = dataclasses.replace(meta, step=save.step, files=_record_files(tmp), format=FORMAT)
        (tmp / META).write_text(meta.to_json())
        (tmp / RUN_CONFIG).write_text(run_config_yaml)
        _fault_point("checkpoint-before-commit", final.name)
        (tmp / COMPLETE).touch()
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        atomic_write_text(self.root / LATEST, final.name)
        if self.keep:
            for old in _step_dirs(self.root)[self.keep:]:
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


def available_keys(ckpt_dir: str | Path) -> set[str]:
    """Keys of every tensor and object stored in a checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader

    from pipeline.megatron_patches import safe_checkpoint_loading

    with safe_checkpoint_loading():
        return set(FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata)


def drop_missing_extra_state(sharded_state: dict, keys: set[str]) -> dict:
    """Without the TE FP8 metadata (`_extra_state`) a checkpoint from the portable backend still loads."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    def keep(value) -> bool:
        return not (isinstance(value, ShardedObject) and value.key.endswith("_extra_state") and value.unique_key not in keys and value.key not in keys)

    def walk(node):
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items() if keep(v)}
        return node

    return walk(sharded_state)


def load_checkpoint(ckpt_dir: str | Path, sharded_state: dict) -> dict:
    """Load `sharded_state` (all ranks), tolerating FP8 metadata absent from the checkpoint.

    Pickled parts are read through `megatron_patches.safe_checkpoint_loading` (an allow-list:
    UnsafeCheckpointError otherwise); any other failure is a CheckpointError naming the checkpoint."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    from pipeline.megatron_patches import safe_checkpoint_loading

    ckpt_dir = Path(ckpt_dir)
    read_meta(ckpt_dir)
    try:
        sharded_state = drop_missing_extra_state(sharded_state, available_keys(ckpt_dir))
        with safe_checkpoint_loading():
            return dist_checkpointing.load(sharded_state, str(ckpt_dir))
    except (Exception, CheckpointException) as exc:  # torch's CheckpointException is a BaseException
        unsafe = _find_cause(exc, lambda e: isinstance(e, UnsafeCheckpointError))
        if unsafe is not None:
            raise unsafe from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise CheckpointError(
            f"cannot load checkpoint {ckpt_dir}: {type(exc).__name__}: {first}; it is damaged or does not fit "
            f"this model (move it away to fall back to the previous one)"
        ) from exc


def model_sharded_state(chunks: list[torch.nn.Module]) -> dict:
    """{"model": ...} for one chunk, {"model0": ..., "model1": ...} with virtual pipeline stages."""
    modules = [getattr(c, "module", c) for c in chunks]
    if len(modules) == 1:
        return {"model": modules[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(modules)}


def apply_model_state(chunks: list[torch.nn.Module], loaded: dict) -> None:
    """Copy the model weights of a loaded state (from `model_sharded_state`) into the chunks."""
    modules = [getattr(c, "module", c) for c in chunks]
    keys = ["model"] if len(modules) == 1 else [f"model{i}" for i in range(len(modules))]
    for module, key in zip(modules, keys):
        weights = {k: v for k, v in loaded[key].items() if not k.endswith("_extra_state")}
        missing, unexpected = module.load_state_dict(weights, strict=False)
        bad = [k for k in missing if not k.endswith("_extra_state")] + list(unexpected)
        if bad:
            raise CheckpointError(f"checkpoint does not match the model: {bad[:3]}")


def load_model(ckpt_dir: str | Path, chunks: list[torch.nn.Module]) -> None:
    """Load only the weights of a checkpoint into this rank's model chunks (any TP/PP layout)."""
    apply_model_state(chunks, load_checkpoint(ckpt_dir, model_sharded_state(chunks)))
