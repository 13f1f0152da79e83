"""Coreset selection methods behind one contract (see :mod:`speccore.selection.base`)."""

from .base import (
    ScoreProvider,
    Selection,
    SelectionMethod,
    StageTimer,
    Verifier,
    get_method,
    method_names,
    register_method,
)

__all__ = [
    "ScoreProvider",
    "Selection",
    "SelectionMethod",
    "StageTimer",
    "Verifier",
    "get_method",
    "method_names",
    "register_method",
]
