"""Errors a user can act on.

Every error raised for bad input is a :class:`SpeccoreError`: the CLI prints its message on one
line and exits with status 2, without a traceback and without writing half an output.
"""

from __future__ import annotations


class SpeccoreError(Exception):
    """A problem with the user's input or settings; the message says what and where."""


class DataError(SpeccoreError):
    """Empty, malformed or incomplete data (the message names the row and field)."""


class ConfigError(SpeccoreError):
    """An argument or setting outside its valid range (the message names it)."""


class ModelError(SpeccoreError):
    """A model that cannot be loaded or used as asked."""


class ScoringError(SpeccoreError):
    """A score that cannot be computed (e.g. a NaN loss; the message names the sample)."""
