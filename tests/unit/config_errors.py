"""The check every table of bad configs shares: composing it raises one line naming what is wrong."""

import pytest

from pipeline.cli import config_error_line
from pipeline.config import load_run_config


def assert_refused_in_one_line(case: str, overrides: list[str], expected: list[str]) -> None:
    """`load_run_config(overrides)` raises a config error of one line that contains every `expected` text."""
    with pytest.raises(Exception) as info:
        load_run_config(overrides)
    line = config_error_line(info.value)
    assert line is not None, f"{case}: {type(info.value).__name__} is not reported as a config error: {info.value}"
    assert "\n" not in line, f"{case}: message is not one line: {line!r}"
    for text in expected:
        assert text in line, f"{case}: {text!r} missing from {line!r}"
