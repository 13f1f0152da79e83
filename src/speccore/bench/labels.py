"""The names a bench's tables and comparisons share: reference rows, metrics and their
direction, a result's row label. Both :mod:`.tables` and :mod:`.paired` read them (neither
imports the other for them)."""

from __future__ import annotations

import math
from typing import Any

FULL = "full"
ZERO_SHOT = "zero-shot"
REFERENCE_LABELS = {ZERO_SHOT: "zero-shot (no fine-tuning)", FULL: "full data (p = 0)"}
RANDOM = "random"
#: ``PairedDiff.kind`` of a variant compared with the method it varies (see bench.paired).
VARIANT_KIND = "base"
METRICS = {
    "rougeL": "ROUGE-L (F1 × 100)",
    "bleu4": "BLEU-4",
    "nll": "Reference NLL (nats/token, lower is better)",
}
SHORT_NAMES = {"rougeL": "ROUGE-L", "bleu4": "BLEU-4", "nll": "reference NLL"}
LOWER_IS_BETTER = frozenset({"nll"})
# (mean, interval) decimals: NLL differences between methods live in the second decimal.


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def row_label(row: dict[str, Any]) -> str:
    """The method row a result belongs to: its method, plus ``+tok<keep>`` when it trained on
    part of the response tokens (``staff +tok0.6``)."""
    keep = row.get("token_keep")
    if keep is None or float(keep) >= 1:
        return str(row["method"])
    return f"{row['method']} +tok{float(keep):g}"


def order_by_mean(means: dict[str, float | None], higher_is_better: bool = True) -> list[str]:
    """Methods with a value, best first (ties keep the order of ``means``)."""
    valid = {m: v for m, v in means.items() if v is not None and not math.isnan(v)}
    return sorted(valid, key=lambda m: -valid[m] if higher_is_better else valid[m])
