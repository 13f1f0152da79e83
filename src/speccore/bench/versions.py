"""Versions of the code a bench cell's result depends on, for its fingerprint.

A finished cell is reused only if it was made by the same code and the same variant
definition: a cell whose versions differ is *stale*, and the bench runs it again instead of
mixing it into the tables. Bump a version whenever a change to that code changes its result
(as :data:`speccore.utils.cache.SCORER_VERSIONS` does for cached scores):

* :data:`GENERATION_VERSION`: greedy decoding (``bench.generate``: stopping, prompt cut);
* :data:`METRICS_VERSION`: ROUGE-L and BLEU-4 scoring (``bench.metrics``);
* the target's fine-tune and the reference NLL are the cache's ``adapter`` and ``loss``
  versions (``train.finetune`` and the ``loss`` score: the same code as the selections');
* a selection: its method's :attr:`~speccore.selection.base.SelectionMethod.version` and every
  scorer version (the selection reads cached scores through them).
"""

from __future__ import annotations

from typing import Any

from .. import scoring  # noqa: F401  (its outputs register their versions)
from ..utils.cache import SCORER_VERSIONS
from ..utils.io import fingerprint

GENERATION_VERSION = 1
METRICS_VERSION = 1


def cell_versions(method: str | None, fine_tuned: bool) -> dict[str, Any]:
    """The code versions of one cell: ``method`` is the registered method that selected its
    coreset (None for full data and zero-shot), ``fine_tuned`` whether the target is trained."""
    versions: dict[str, Any] = {
        "generation": GENERATION_VERSION,
        "metrics": METRICS_VERSION,
        "reference_nll": SCORER_VERSIONS["loss"],
    }
    if fine_tuned:
        versions["finetune"] = SCORER_VERSIONS["adapter"]
    if method is not None:
        from ..selection.base import method_class

        versions["method"] = {method: method_class(method).version}
        versions["scorers"] = dict(SCORER_VERSIONS)
    return versions


def cell_fingerprint(versions: dict[str, Any], variant: dict[str, Any] | None) -> str:
    """A cell's fingerprint beyond the bench settings: its code versions and, for a variant,
    its definition (``{method: staff, small: ...}``)."""
    return fingerprint(versions, variant or None)


def what_changed(record: dict[str, Any], versions: dict[str, Any], variant: Any) -> list[str]:
    """What differs between a finished cell and the code and definition of now, in words."""
    changed = []
    old = record.get("code_versions")
    if old is None:
        changed.append("no code versions recorded (made before they were)")
    else:
        for key in sorted(set(old) | set(versions)):
            if old.get(key) != versions.get(key):
                changed.append(f"{key} {old.get(key)} → {versions.get(key)}")
    if (record.get("variant") or None) != (variant or None):
        changed.append(f"variant {record.get('variant')} → {variant}")
    return changed
