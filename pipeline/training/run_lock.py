"""One owner per run directory: a lock that dies with its process.

    with run_dir_owner(run_dir, world):   # all ranks; rank 0 holds run_dir/.lock
        ...                               # write checkpoints, metrics, config.yaml, compress/

Two commands on one run_dir (a double-submitted job, a requeue racing a manual restart, two
`compress all`) would overwrite each other's checkpoints, metrics and compression results. Every
command that writes a run_dir (training, each compression step) owns it this way. Rank 0 takes an
exclusive lock on run_dir/.lock before anything else is written and writes its host, pid and start
time into it; a second trainer is refused at once with RunDirLockedError naming that holder.
Ownership nests: a command that already owns run_dir (`compress all`) keeps it through the trainer
it runs there. The lock is a POSIX record lock (`fcntl.lockf`), owned by the process: the kernel
drops it when the process exits in any way (kill -9 included), so there is never a stale lock to
clean up. (An `flock` would be shared with forked children, e.g. megatron-core's checkpoint writers,
and outlive the trainer while they linger.) The other ranks of the same job learn the outcome from
rank 0 (a broadcast), so they share its ownership. On network file systems the lock needs lock
support (NFS: lockd or v4; Lustre: the flock or localflock mount option).
"""

import errno
import fcntl
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

from pipeline.errors import RunDirLockedError
from pipeline.fs import storage_error

LOCK_FILE = ".lock"

_owned: set[Path] = set()
"""The run dirs this process owns now (on every rank). Taken once: a POSIX lock is released when any
descriptor of its file is closed, so a nested owner must not open the file again."""


def _refusal(run_dir: Path, holder: str) -> RunDirLockedError:
    return RunDirLockedError(
        f"run_dir {run_dir} is in use by another run ({holder or 'a process that is starting'}); wait for it "
        f"to end or stop it, or choose another run_dir"
    )


def check_not_in_use(run_dir: str | Path) -> None:
    """RunDirLockedError naming the holder if another process owns run_dir now; writes nothing (a
    command checks this before its other inputs: what another run is still writing may be missing)."""
    run_dir = Path(run_dir)
    if run_dir.resolve() in _owned:
        return
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        raise _refusal(run_dir, os.pread(fd, 1000, 0).decode(errors="replace").strip()) from None
    finally:
        os.close(fd)  # closing drops the probe's own lock, if it got one


def _take(run_dir: Path) -> int:
    """The descriptor holding the lock on run_dir/.lock; RunDirLockedError naming the holder if taken."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            os.close(fd)
            raise
        holder = os.pread(fd, 1000, 0).decode(errors="replace").strip()
        os.close(fd)
        raise _refusal(run_dir, holder) from None
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} started {started}\n".encode(), 0)
    return fd


@contextmanager
def run_dir_owner(run_dir: str | Path, rank: int):
    """Own `run_dir` for the duration (see the module docstring); call on every rank."""
    key = Path(run_dir).resolve()
    if key in _owned:
        yield
        return
    fd, refusal = None, None
    if rank == 0:
        try:
            fd = _take(Path(run_dir))
        except RunDirLockedError as e:
            refusal = e
        except OSError as e:  # every rank learns it (they would wait in the broadcast for ever)
            refusal = storage_error(e, "the run lock", Path(run_dir) / LOCK_FILE)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [refusal]
        dist.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal is not None:
        raise refusal
    _owned.add(key)
    try:
        yield
    finally:
        _owned.discard(key)
        if fd is not None:
            os.close(fd)
