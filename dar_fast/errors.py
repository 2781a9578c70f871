"""Errors a user can cause and fix: the CLI prints them as one line (no traceback) and exits with code 2."""
from __future__ import annotations


class UsageError(ValueError):
    """Bad input from the caller (an argument, a file, a setting): the message names the problem and the fix."""


class MissingPackage(UsageError, ImportError):
    """An optional package this path needs is not installed: the message names what to pip install."""
