"""Coreset selection methods behind one contract (see :mod:`speccore.selection.base`)."""

# Importing the method modules fills the registry.
from . import ccs, d2, perplexity, random, s2l, score_based, staff, target_only  # noqa: F401
from .base import (
    ModelWork,
    ScoreProvider,
    Selection,
    SelectionMethod,
    StageTimer,
    get_method,
    method_names,
    register_method,
)

__all__ = [
    "ModelWork",
    "ScoreProvider",
    "Selection",
    "SelectionMethod",
    "StageTimer",
    "get_method",
    "method_names",
    "register_method",
]
