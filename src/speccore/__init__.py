"""speccore: speculative coreset selection (STAFF) for LLM fine-tuning."""

from __future__ import annotations

from .config import LoraSettings, SelectConfig, TrainSettings, coreset_size
from .data import load_rows
from .run.pipeline import select
from .selection import Selection, get_method, method_names
from .utils.errors import SpeccoreError

__version__ = "0.1.0"

__all__ = [
    "LoraSettings",
    "SelectConfig",
    "Selection",
    "SpeccoreError",
    "TrainSettings",
    "__version__",
    "coreset_size",
    "get_method",
    "load_rows",
    "method_names",
    "select",
]
