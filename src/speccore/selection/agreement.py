"""How well a small model's scores agree with the target's: Spearman's rank correlation and the
Rand index of the regions each induces. One module for every place that reports agreement:
STAFF's verified samples (:mod:`.staff`), ``speccore agree``, the run summary and the bench.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .regions import equal_width_regions

#: Spearman over fewer samples is undefined (2 samples: always ±1) and reported as None.
MIN_SAMPLES = 3


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation, or None when undefined (fewer than :data:`MIN_SAMPLES`
    values, or either side constant)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) != len(b):
        raise ValueError(f"{len(a)} small scores but {len(b)} target scores")
    if len(a) < MIN_SAMPLES or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def rand_index(small: np.ndarray, target: np.ndarray, regions: int) -> float | None:
    """Rand index between the regions small and target scores induce on the same samples, each
    split into ``regions`` equal-width regions over its own range (None below 2 samples)."""
    if len(small) != len(target):
        raise ValueError(f"{len(small)} small scores but {len(target)} target scores")
    if len(small) < 2 or regions < 1:
        return None
    a = equal_width_regions(np.asarray(small, dtype=np.float64), regions)
    b = equal_width_regions(np.asarray(target, dtype=np.float64), regions)
    return rand_index_labels(a, b)


def rand_index_labels(a: np.ndarray, b: np.ndarray) -> float:
    """Share of sample pairs on which two labelings agree (both together or both apart).

    From the contingency table ``n_ij``: agreeing pairs = ``C(n,2) + 2·Σ C(n_ij,2) − Σ C(a_i,2)
    − Σ C(b_j,2)``, with ``a_i``/``b_j`` the label counts of each labeling.
    """
    a, b = np.asarray(a), np.asarray(b)
    n = len(a)
    if n < 2:
        return 1.0
    _, a_ids = np.unique(a, return_inverse=True)
    _, b_ids = np.unique(b, return_inverse=True)
    cells = np.unique(np.stack([a_ids, b_ids]), axis=1, return_counts=True)[1]

    def pairs(counts: np.ndarray) -> float:
        c = counts.astype(np.float64)
        return float((c * (c - 1) / 2).sum())

    total = n * (n - 1) / 2
    same_both = pairs(cells)
    agreeing = total + 2 * same_both - pairs(np.bincount(a_ids)) - pairs(np.bincount(b_ids))
    return agreeing / total


def verified_scores(selection: Any) -> tuple[Any, Any]:
    """Small and target scores of STAFF's verified samples, or ``(None, None)``.

    STAFF stores them with its agreement (``info["agreement"]``: ``indices``, ``small``,
    ``target``); ``info["verified"]`` with the same keys is read too. Without ``small``, the
    small scores are looked up in the selection's ``scores`` by ``indices``.
    """
    if isinstance(selection, dict):
        info, scores = selection.get("info", {}), selection.get("scores")
    else:
        info, scores = selection.info, selection.scores
    found = [
        v
        for v in (info.get("verified"), info.get("agreement"))
        if isinstance(v, dict) and v.get("target")
    ]
    if not found:
        return None, None
    verified = found[0]
    target = np.asarray(verified["target"], dtype=np.float64)
    if verified.get("small"):
        small = np.asarray(verified["small"], dtype=np.float64)
    elif scores is not None and verified.get("indices"):
        small = np.asarray(scores, dtype=np.float64)[
            np.asarray(verified["indices"], dtype=np.int64)
        ]
    else:
        return None, None
    return small, target


def verified_rand_index(selection: Any, regions: int) -> float | None:
    """Rand index of the K equal-width regions that the small and the target scores of STAFF's
    verified samples (:func:`verified_scores`) each induce; None without verified scores."""
    small, target = verified_scores(selection)
    if small is None or regions < 1:
        return None
    return rand_index(small, target, regions)
