"""Equal-width regions over a score range (STAFF's regions, CCS's strata)."""

from __future__ import annotations

import numpy as np


def equal_width_regions(scores: np.ndarray, k: int) -> np.ndarray:
    """Region id (0..k-1) of every score, for ``k`` bins of equal width over [min, max].

    Bin i covers [min + i·w, min + (i+1)·w) with w = (max − min)/k; the last bin also holds max.
    All scores equal → every sample in region 0. Empty bins are simply ids no sample carries.
    """
    if k < 1:
        raise ValueError(f"number of regions must be >= 1, got {k}")
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0:
        return np.zeros(0, dtype=np.int64)
    lo, hi = float(scores.min()), float(scores.max())
    if hi <= lo:
        return np.zeros(len(scores), dtype=np.int64)
    width = (hi - lo) / k
    ids = np.floor((scores - lo) / width).astype(np.int64)
    return np.clip(ids, 0, k - 1)


def region_members(region_ids: np.ndarray) -> dict[int, np.ndarray]:
    """Sample indices of each non-empty region, keyed by region id (ascending indices)."""
    order = np.argsort(region_ids, kind="stable")
    ids, starts = np.unique(region_ids[order], return_index=True)
    bounds = [*starts[1:], len(order)]
    return {int(r): order[s:e] for r, s, e in zip(ids, starts, bounds, strict=True)}
