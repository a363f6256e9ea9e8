"""Small file-system helpers: atomic files and directories, and one-line messages for failed writes.

Everything the pipeline writes that a later run reads (checkpoint pointers, summaries, datasets,
exported models) appears whole or not at all: written beside its final name, flushed, then renamed.
"""

import errno
import os
import shutil
from pathlib import Path

from pipeline.errors import StorageError


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def temporary_sibling(target: str | Path) -> Path:
    """A fresh empty directory next to `target` (same file system, so the final rename is atomic)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def replace_dir(tmp: str | Path, target: str | Path) -> None:
    """Move the finished directory `tmp` to `target`; an existing `target` is removed only after the swap."""
    tmp, target = Path(tmp), Path(target)
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)
    fsync_dir(target.parent)


def overlaps(a: str | Path, b: str | Path) -> bool:
    """True if paths `a` and `b` (links resolved) are the same, or one lies inside the other: replacing
    one would delete or write into the other."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)
"""The errors of a file system rather than of the program: full, read-only, not permitted, failing."""


def storage_error_of(exc: BaseException) -> StorageError | None:
    """The one-line StorageError for an OSError of the file system (STORAGE_ERRNOS) raised anywhere,
    directly or as the cause of `exc`, naming the file it names; None for any other exception. Entry
    points turn what no writer caught itself into one line with this (pipeline.cli)."""
    while exc is not None and not isinstance(exc, OSError):
        exc = exc.__cause__
    if exc is None or exc.errno not in STORAGE_ERRNOS:
        return None
    path = Path(os.fsdecode(exc.filename)) if exc.filename else None
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        if path is not None:
            return storage_error(exc, path.name, path.parent)
        return StorageError(f"disk full while writing a file ({os.strerror(exc.errno)}); free space or point the "
                            f"output elsewhere, then rerun")
    return StorageError(
        f"{path or 'the file system'}: {os.strerror(exc.errno)}; fix the permissions or the storage, or choose "
        f"another location, then rerun"
    )


def storage_error(exc: OSError, what: str, where: str | Path) -> StorageError:
    """A one-line StorageError for a failed write of `what` under `where` (disk full, read-only, permissions)."""
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        usage = shutil.disk_usage(Path(where) if Path(where).exists() else Path(where).parent)
        return StorageError(
            f"disk full while writing {what} to {where} ({usage.free / 2**30:.2f} GiB free); free space "
            f"or point the output elsewhere, then rerun"
        )
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StorageError(f"cannot write {what} to {where}: {os.strerror(code)}; choose a writable location")
    return StorageError(f"writing {what} to {where} failed: {exc}; check the file system and rerun")
