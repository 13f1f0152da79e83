"""One selection run, end to end: its settings checked, the models' work served through the
provider (cached), the method called, the run folder written (:func:`select`), and the dry run
that times the plan before any of it."""

from .pipeline import select

__all__ = ["select"]
