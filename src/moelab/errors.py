"""User-facing errors: one class the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations


class MoelabError(Exception):
    """A problem with the user's input (config, data, paths, checkpoints), not a bug in moelab.

    The message must say what was wrong and what is allowed; the CLI prints it as one line and
    exits with status 2.
    """


class ConfigError(MoelabError, ValueError):
    """An impossible or unknown configuration setting."""

    def __init__(self, field: str, value: object, allowed: str):
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field} = {value!r} is not allowed: {allowed}")


class CheckpointError(MoelabError):
    """A checkpoint that is missing, incomplete or damaged."""
