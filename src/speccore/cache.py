"""On-disk cache of adapters and scores, keyed by fingerprints (as ``datasets`` does).

A key is a digest of everything the value depends on: the model's identity, the adapter's
weights, the tokenised data and the scorer's settings. Changing the pruning rate, K, b_v or the
seed changes none of them, so a rerun only re-selects.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .io import cache_root, load_npz, save_npz

logger = logging.getLogger(__name__)


class ScoreCache:
    """Scores of all samples (``full``) and of some samples (``partial``, e.g. verification)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root else cache_root()

    def adapter_dir(self, key: str) -> Path:
        return self.root / "adapters" / key

    def checkpoint_path(self, key: str) -> Path:
        return self.root / "scores" / f"{key}.checkpoint.npz"

    def _full_path(self, key: str) -> Path:
        return self.root / "scores" / f"{key}.npz"

    def _partial_path(self, key: str) -> Path:
        return self.root / "scores" / f"{key}.partial.npz"

    def get_full(self, key: str) -> np.ndarray | None:
        path = self._full_path(key)
        if not path.exists():
            return None
        logger.info("scores from cache: %s", path)
        return load_npz(path)["values"]

    def put_full(self, key: str, values: np.ndarray) -> None:
        save_npz(self._full_path(key), values=np.asarray(values))
        self.checkpoint_path(key).unlink(missing_ok=True)

    def get_partial(self, key: str) -> dict[int, float]:
        """Scores of the samples scored so far under ``key`` (index → score)."""
        path = self._partial_path(key)
        if not path.exists():
            return {}
        z = load_npz(path)
        return dict(zip(z["indices"].tolist(), z["values"].tolist(), strict=True))

    def put_partial(self, key: str, scores: dict[int, float]) -> None:
        idx = np.array(sorted(scores), dtype=np.int64)
        save_npz(self._partial_path(key), indices=idx, values=np.array([scores[i] for i in idx]))
