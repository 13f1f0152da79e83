"""Speculative scores from a file (``--scores``): STAFF's small-model scores computed elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..utils.errors import DataError
from ..utils.io import load_npz


def load_scores_file(path: str, n: int) -> np.ndarray:
    """Precomputed speculative scores: ``.npy``, ``.npz`` (first array or ``scores``) or a JSON
    list, of one dimension. Never unpickled."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"--scores: file not found: {path}")
    try:
        if p.suffix == ".npy":
            values = np.load(p, allow_pickle=False)
        elif p.suffix == ".npz":
            arrays = load_npz(p)
            values = arrays.get("scores", next(iter(arrays.values())))
        else:
            values = np.asarray(json.loads(p.read_text(encoding="utf-8")), dtype=np.float64)
    except (ValueError, json.JSONDecodeError, StopIteration) as err:
        raise DataError(f"--scores: cannot read {path}: {err}") from None
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise DataError(
            f"--scores: {path} holds an array of shape {values.shape}; expected one score per "
            "row (one dimension)"
        )
    if len(values) != n:
        raise DataError(f"--scores: {path} holds {len(values)} scores but the data has {n} rows")
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise DataError(
            f"--scores: score of row {int(bad[0]) + 1} (1-based) is {values[bad[0]]}; "
            "scores must be finite"
        )
    return values
