"""On-disk cache of adapters and scores, keyed by fingerprints (as ``datasets`` does).

:func:`cache_key` is the one place a key is built: a digest of everything a value depends on
(the model's identity with its hub revision or file hash, the dtype and device type it ran in,
the scorer and the version of the scorer's code, the tokenised data and the adapter's weights).
Changing the pruning rate, K, b_v or the seed changes none of them, so a rerun only re-selects;
a bfloat16 GPU score is never served to a float32 CPU run, and bumping a version in
:data:`SCORER_VERSIONS` retires every score computed by the old code.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .io import cache_root, fingerprint, load_npz, save_npz
from .locks import file_lock

logger = logging.getLogger(__name__)

# Bump an entry whenever the code computing that value changes its result. The per-sample model
# outputs (effort, loss, el2n, embedding) add theirs when they register
# (:func:`speccore.scoring.outputs.register_output`).
SCORER_VERSIONS: dict[str, int] = {
    "token-loss": 2,
    "trajectory": 1,
    "perplexity": 1,
    "adapter": 2,  # the LoRA fine-tune (train.finetune)
    "derive": 1,  # a derived small model (speccore.proxies.derive): layer choice, healing, folder
}


def register_version(name: str, version: int) -> None:
    """Record the code version of value family ``name`` (refused if it has another one)."""
    if SCORER_VERSIONS.get(name, version) != version:
        raise ValueError(f"{name!r} already has version {SCORER_VERSIONS[name]}, not {version}")
    SCORER_VERSIONS[name] = version


def model_identity(loaded: Any) -> str:
    """A model's identity for keys: its source (alias + package version, or local files with
    sizes and mtimes, or hub name) and, for a hub model, the revision actually loaded."""
    identity = loaded.source.identity
    revision = getattr(getattr(loaded.model, "config", None), "_commit_hash", None)
    return f"{identity}@{revision}" if revision else identity


def cache_key(
    kind: str,
    *,
    model: str,
    dtype: str,
    device: str,
    data: str,
    adapter: str | None = None,
    scorer: str | None = None,
    extra: Any = None,
) -> str:
    """The key of one cached value.

    ``kind`` is "scores", "partial-scores", "adapter" or another value family; ``model`` is
    :func:`model_identity`; ``dtype`` the torch dtype the model ran in (``"torch.bfloat16"``);
    ``device`` its device type (``"cpu"``, ``"cuda"``); ``data`` the tokenised data's fingerprint;
    ``adapter`` the adapter weights' fingerprint; ``scorer`` a name in :data:`SCORER_VERSIONS`
    (its version goes into the key); ``extra`` anything else the value depends on (settings).
    """
    version = None
    if scorer is not None:
        if scorer not in SCORER_VERSIONS:
            raise KeyError(f"scorer {scorer!r} has no entry in SCORER_VERSIONS")
        version = SCORER_VERSIONS[scorer]
    return fingerprint(kind, model, dtype, device, data, adapter, scorer, version, extra)


class ScoreCache:
    """Scores of all samples (``full``) and of some samples (``partial``, e.g. verification),
    and tuned adapters. ``enabled=False`` (``--no-cache``) reads nothing and keeps what it
    writes in a temporary folder that lives as long as the cache object."""

    def __init__(self, root: str | Path | None = None, *, enabled: bool = True) -> None:
        self.enabled = enabled
        if enabled:
            self.root = Path(root) if root else cache_root()
        else:
            self._tmp = tempfile.mkdtemp(prefix="speccore-nocache-")
            self.root = Path(self._tmp)

    def __del__(self) -> None:
        if not getattr(self, "enabled", True):
            shutil.rmtree(self._tmp, ignore_errors=True)

    def lock(self, key: str, what: str) -> contextlib.AbstractContextManager[None]:
        """Hold entry ``key``'s lock while computing it (``what`` names it in the log): a
        second process that needs it waits, then reads it from the cache. No lock without a
        cache: nothing is shared."""
        if not self.enabled:
            return contextlib.nullcontext()
        return file_lock(self.root / "locks" / f"{key}.lock", what)

    def adapter_dir(self, key: str) -> Path:
        return self.root / "adapters" / key

    def has_adapter(self, key: str) -> bool:
        return (self.adapter_dir(key) / "adapter_model.safetensors").exists()

    def checkpoint_path(self, key: str) -> Path:
        return self.root / "scores" / f"{key}.checkpoint.npz"

    def partial_checkpoint_path(self, key: str) -> Path:
        """Progress of scoring some samples (verification) under ``key``."""
        return self.root / "scores" / f"{key}.partial-checkpoint.npz"

    def finetune_checkpoint(self, key: str) -> Path:
        """Progress of the fine-tune that makes adapter ``key`` (removed once it is saved)."""
        return self.root / "adapters" / f"{key}.finetune"

    def work_dir(self, key: str) -> Path:
        """A folder for the intermediate files of computing ``key`` (Ray shards)."""
        return self.root / "scores" / f"{key}.work"

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
