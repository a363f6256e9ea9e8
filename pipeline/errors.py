"""Errors the pipeline raises for bad user input or a damaged environment (configs, data, checkpoints, paths).

Every `PipelineError` carries a one-line message that names the problem and the fix. The entry points
print it as `error: <line>` and exit with status 2 (`EXIT_USER_ERROR`); anything else is a bug or an
unexpected failure and ends with a traceback and status 1.
"""

EXIT_USER_ERROR = 2
"""Exit status of every entry point for a `PipelineError` (bad config, data, checkpoint or path)."""


class PipelineError(Exception):
    """A problem the user can fix; the message is one line naming the problem and the fix."""


class ConfigError(PipelineError, ValueError):
    """A configuration value (Hydra override, YAML, CLI flag) is invalid."""


class CheckpointError(PipelineError):
    """A checkpoint is missing, incomplete, damaged or does not fit the run."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint's pickled parts reference code outside the allow-list: refused unopened."""


class DataError(PipelineError):
    """Input data or a dataset on disk is missing, malformed, truncated or inconsistent."""


class ConversionError(PipelineError):
    """A Hugging Face conversion request cannot be carried out (paths, configs, shapes)."""


class RunDirLockedError(PipelineError):
    """Another live process owns the run directory."""


class StorageError(PipelineError):
    """The file system refused a write (disk full, read-only, permissions)."""


def find_cause(exc: BaseException, wanted) -> BaseException | None:
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
