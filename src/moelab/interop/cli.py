"""CLI commands of this subsystem (registered by moelab.cli)."""

from __future__ import annotations


def register(sub, command) -> None:
    """Add this subsystem's subcommands to the `moelab` parser."""
