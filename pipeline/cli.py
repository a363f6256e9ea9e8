"""Command-line glue shared by the entry points: Hydra apps over conf/config.yaml, one-line errors.

An entry point is a real Hydra app (so `--help`, `--cfg job|hydra`, `--info`, `--shell-completion`
and `-m` sweeps work) written in three parts:

    @hydra.main(config_path=CONF_PATH, config_name="config", version_base=None)
    def main(cfg: DictConfig) -> None:
        run = run_config_of(cfg)          # validated RunConfig; run_dir per job under -m
        with exit_on_user_error():
            do_the_work(run)

    if __name__ == "__main__":
        launch(main)                      # checks the overrides first, then runs the app

Exit status (docs/cli.md): 0 on success; 2 with one line `error: <problem and fix>` on stderr for
a `PipelineError`, a bad override or a file-system failure (disk full, read-only, permissions: `fs.storage_error_of`,
wherever it happens); anything else is a bug and ends with a traceback (status 1).
`launch` composes and validates the command line's overrides (every job of a sweep) before Hydra
starts, because Hydra reports composition errors over several lines and exits 1.
"""

import dataclasses
import sys
from contextlib import contextmanager
from typing import Callable

from omegaconf import DictConfig

from pipeline.config import CONF_DIR, RunConfig, load_run_config, register_configs, to_run_config
from pipeline.errors import EXIT_USER_ERROR, PipelineError
from pipeline.fs import storage_error_of
from pipeline.processes import skip_final_collection

CONF_PATH = str(CONF_DIR)
"""`config_path` of every entry point's @hydra.main (an absolute path: entry points may run as scripts)."""


def config_error_line(exc: BaseException) -> str | None:
    """A one-line description of a user error (bad config, data, checkpoint, path), or None if `exc`
    is not one."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if isinstance(exc, PipelineError):
        return str(exc)
    storage = storage_error_of(exc)
    if storage is not None:
        return str(storage)
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
def exit_on_user_error():
    """Turn user errors (see `config_error_line`) into `error: <one line>` on stderr and exit status 2."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is a user error
        line = config_error_line(exc)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def _job_overrides(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override list of every job the command line starts: one, or each point of a sweep
    (expanded as Hydra's basic sweeper does)."""
    if not multirun:
        return [overrides]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    (jobs,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return jobs


def check_overrides(argv: list[str], check_job: Callable[[RunConfig], None] | None = None) -> None:
    """Compose and validate the run config of every job `argv` starts (and `check_job` it, e.g. against
    this machine); exit 2 with one line if one is bad. Help, shell completion and extra config
    directories are left to Hydra."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    if args.help or args.hydra_help or args.shell_completion or args.config_dir or args.config_path:
        return
    with exit_on_user_error():
        for overrides in _job_overrides(args.overrides, args.multirun):
            run = load_run_config(overrides, config_name=args.config_name or "config")
            if check_job is not None:
                check_job(run)


def launch(app: Callable[[], None], check_job: Callable[[RunConfig], None] | None = None) -> None:
    """Run a @hydra.main app on this process's command line, its overrides (and `check_job` of every
    job) checked first."""
    register_configs()
    check_overrides(sys.argv[1:], check_job)
    try:
        app()
    finally:
        skip_final_collection()


def run_config_of(cfg: DictConfig) -> RunConfig:
    """The validated RunConfig of a Hydra job (exit 2 with one line if invalid). Under `-m` each job
    runs in its own directory, `hydra.sweep.dir/hydra.sweep.subdir` (see conf/config.yaml)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    with exit_on_user_error():
        run = to_run_config(cfg)
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            run = dataclasses.replace(run, run_dir=hydra_cfg.runtime.output_dir)
    return run
