"""A scoring request: everything an engine needs to score samples, as plain data.

Engines (the local batch loop, Ray) take a :class:`ScoringRequest` and return float64 scores
aligned with ``indices``; they know nothing of providers, model slots or configurations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data.batches import TokenizedData


@dataclass
class ScoringRequest:
    """Score ``scorer`` of the samples at ``indices`` (all when None) of ``data``.

    ``model`` is the in-memory model with its adapter in use (the local engine runs it);
    ``model_name``, ``dtype`` and ``save_adapter`` let another process rebuild the same model
    (Ray workers). ``key`` is the cache key of these scores; ``work_dir`` holds checkpoints and
    shards under it.
    """

    model: Any
    model_name: str
    dtype: str
    device: str
    save_adapter: Callable[[Path], object]
    adapter_fp: str
    data: TokenizedData
    scorer: str
    key: str
    work_dir: Path
    max_batch_tokens: int
    indices: np.ndarray | None = None
    checkpoint: Path | None = None
    checkpoint_seconds: float = 30.0
    desc: str = ""
