"""Errors the pipeline raises for bad user input (configs, data, checkpoints, paths)."""


class ConfigError(ValueError):
    """A configuration value is invalid. The message is one line naming the field and the fix."""
