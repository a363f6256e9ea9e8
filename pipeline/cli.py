"""Command-line glue shared by the entry points: Hydra overrides in, a RunConfig or a one-line error out."""

import dataclasses
import sys
from contextlib import contextmanager

from pipeline.errors import EXIT_USER_ERROR, PipelineError


def config_error_line(exc: BaseException) -> str | None:
    """A one-line description of a configuration error, or None if `exc` is not one."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if isinstance(exc, PipelineError):
        return str(exc)
    if isinstance(exc, OverrideParseException):
        return f"cannot parse override: {str(exc).splitlines()[0]}; write overrides as key=value"
    if isinstance(exc, MissingConfigException):
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        options = [line for line in lines[2:] if not line.startswith(("Config search path", "provider="))]
        return f"{lines[0]}; available: {', '.join(options)}" if options else lines[0]
    cause = exc.__cause__ if isinstance(exc, ConfigCompositionException) else exc
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        key = getattr(cause, "full_key", None) or "?"
        schema = getattr(cause, "object_type", None)
        valid = ""
        if schema is not None and dataclasses.is_dataclass(schema):
            valid = f" (valid keys: {', '.join(f.name for f in dataclasses.fields(schema))})"
        return f"unknown config key {key}; check the spelling{valid}"
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None)
        first = str(cause).splitlines()[0]
        return f"{key}: {first}" if key else first
    if isinstance(exc, ConfigCompositionException):
        return str(exc).replace("\n", " ")
    return None


@contextmanager
def exit_on_config_error():
    """Turn configuration errors into `error: <one line>` on stderr and exit status 2."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is a config error
        line = config_error_line(exc)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def run_config_from_argv(argv: list[str]):
    """The RunConfig for command-line Hydra overrides, exiting with a one-line error when invalid."""
    from pipeline.config import load_run_config

    with exit_on_config_error():
        return load_run_config(argv)
