"""Errors shared by every layer that reports bad user input."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad options, paths or inputs: reported as one line (``fedkseed`` exits with code 2)."""
