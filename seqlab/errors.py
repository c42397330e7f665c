"""Errors are part of the API: each names the argument, what was expected and what was given."""

from __future__ import annotations


class SeqlabError(Exception):
    """Base class of every error seqlab raises on purpose."""


class InputError(SeqlabError, ValueError):
    """A tensor or argument has the wrong shape, dtype, device or value."""

    def __init__(self, argument: str, expected: str, given: object):
        self.argument, self.expected, self.given = argument, expected, given
        super().__init__(f"{argument}: expected {expected}, got {given}")


class ConfigError(SeqlabError, ValueError):
    """A configuration, preset name or command-line option is invalid."""


class CheckpointError(SeqlabError):
    """A checkpoint or state file is missing, truncated or does not match the model."""


class BackendUnavailable(SeqlabError, RuntimeError):
    """The requested compute backend cannot run on these inputs or this machine."""
