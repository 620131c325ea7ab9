"""Errors a user can cause, each with a one-line message fit for a terminal.

The CLI catches :class:`OvssError`, prints ``str(error)`` without a traceback and exits
with the error's ``exit_code``; every other exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class OvssError(Exception):
    """Base class: a problem the user can fix. The message says what and how."""

    exit_code: int = 1


class UsageError(OvssError):
    """Bad option values or a bad vocabulary."""

    exit_code = 2


class InputError(OvssError):
    """An input path or image that cannot be read."""

    exit_code = 3


class WeightsError(OvssError):
    """A checkpoint that is missing, corrupt, the wrong model, or could not be downloaded."""

    exit_code = 4


class DatasetError(OvssError):
    """A dataset that is missing or not laid out as expected."""

    exit_code = 5


class OutputError(OvssError):
    """The outputs cannot be written: the output folder is a file or read-only, or the disk is
    full. Finished images are kept; a re-run continues once the cause is fixed."""

    exit_code = 7


class OvssWarning(UserWarning):
    """Something worth telling the user that does not stop the work (the CLI prints one line)."""


class NotImplementedYet(OvssError):
    """A command that exists in the interface but is not built yet."""

    exit_code = 6


# Exit code when a run finished but some images failed (each failure was reported).
EXIT_SOME_FAILED = 1


def failure_reason(error: BaseException) -> str:
    """One line for a per-image failure: our own message, else the exception type and text."""
    return str(error) if isinstance(error, OvssError) else f"{type(error).__name__}: {error}"
