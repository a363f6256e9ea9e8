"""Fault injection from the tests (sitecustomize.py here); `pipeline/` has no fault hooks."""

from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def fault_env(fault: str) -> dict:
    """Environment that makes every Python process of a command hit `fault` (`<fault>@<where>`, see
    sitecustomize.py): this directory goes first on PYTHONPATH, so Python imports its sitecustomize."""
    return {"PIPELINE_TEST_FAULT": fault, "PYTHONPATH": f"{HERE}:{REPO}"}
