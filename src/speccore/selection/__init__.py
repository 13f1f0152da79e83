"""Coreset selection methods behind one contract (see :mod:`speccore.selection.base`)."""

# The methods themselves are found through the ``speccore.methods`` entry points (see
# :func:`~speccore.selection.base.load_methods`), built-in ones included.
from .base import (
    ModelWork,
    ScoreProvider,
    Selection,
    SelectionMethod,
    StageTimer,
    get_method,
    load_methods,
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
    "load_methods",
    "method_names",
    "register_method",
]
