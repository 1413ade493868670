"""Exceptions whose type decides the exit code.

A `GruDeployError` is shown as one line without a traceback; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class GruDeployError(Exception):
    """Base of every error the tool reports to the user as one line."""

    exit_code = 1


class UserInputError(GruDeployError):
    """Bad input or usage: a missing file, bad data, an option out of range (exit 2)."""

    exit_code = 2


class CheckFailed(GruDeployError):
    """A check ran and failed: parity, checksum, unrolled graph (exit 1)."""

    exit_code = 1


class WriteFailed(GruDeployError):
    """An output could not be written (disk full, file size limit, permissions): exit 1.

    Writes are atomic, so the earlier file or folder is left as it was.
    """

    exit_code = 1
