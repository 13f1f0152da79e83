"""What a coreset looks like next to the full data: groups, lengths, stage times."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import datasets

    from ..data.batches import TokenizedData
    from ..selection.base import Selection


def distribution(values: np.ndarray) -> dict[str, float]:
    """Mean and quartiles: enough to see a coreset drift towards short responses."""
    if len(values) == 0:
        return {}
    q = np.percentile(values, [25, 50, 75])
    return {
        "mean": float(values.mean()),
        "p25": float(q[0]),
        "median": float(q[1]),
        "p75": float(q[2]),
    }


def describe(
    selection: Selection,
    dataset: datasets.Dataset,
    output_field: str | None,
    group_field: str | None,
    tokens: TokenizedData | None,
) -> dict[str, Any]:
    """Kept fraction per group and response length distributions, coreset vs full data, and
    the Rand index of the small/target regions over STAFF's verified samples.

    Effort is the norm of a *mean* loss's gradient, which is larger for short responses: this
    makes such a drift visible.
    """
    keep = selection.mask
    out: dict[str, Any] = {}
    rand = verified_rand_index(selection)
    if rand is not None:  # beside info["agreement"]["spearman"]: same verified samples
        out["agreement_rand_index"] = rand
    if output_field and output_field in dataset.column_names:
        chars = np.array([len(str(x)) for x in dataset[output_field]], dtype=np.float64)
        out["response_chars"] = {"full": distribution(chars), "coreset": distribution(chars[keep])}
    if tokens is not None:
        n_tok = tokens.n_response_tokens.astype(np.float64)
        out["response_tokens"] = {"full": distribution(n_tok), "coreset": distribution(n_tok[keep])}
        total = tokens.lengths.astype(np.float64)
        out["total_tokens"] = {"full": float(total.sum()), "coreset": float(total[keep].sum())}
    if group_field:
        groups = np.array([str(g) for g in dataset[group_field]])
        names, counts = np.unique(groups, return_counts=True)
        kept = {str(g): int(keep[groups == g].sum()) for g in names}
        out["groups"] = {
            str(g): {"total": int(c), "kept": kept[str(g)], "fraction": kept[str(g)] / int(c)}
            for g, c in zip(names, counts, strict=True)
        }
    return out


def verified_rand_index(selection: Selection) -> float | None:
    """Rand index of the regions over STAFF's verified samples (K = the run's ``regions``)."""
    from ..selection.agreement import verified_rand_index as rand_of

    return rand_of(selection, int(selection.config.get("regions") or 0))


def summary_text(selection: Selection) -> str:
    """A few lines for a person: sizes, regions, agreement, stage times."""
    lines = [
        f"{selection.method}: kept {len(selection)} of {selection.n_total} samples "
        f"(budget m = {selection.budget})"
    ]
    info = selection.info
    if "n_regions" in info:
        lines.append(
            f"regions: {info['n_regions']} non-empty, {info.get('n_verified', 0)} samples verified "
            f"on the target, {info.get('n_filled', 0)} topped up"
        )
    agree = info.get("agreement") or {}
    if agree.get("spearman") is not None:
        rand = verified_rand_index(selection)
        rand_text = "" if rand is None else f", Rand index {rand:.2f}"
        lines.append(
            f"small/target agreement: Spearman {agree['spearman']:.2f}{rand_text} over "
            f"{agree['n']} samples"
        )
    report = info.get("report", {})
    tok = report.get("response_tokens")
    if tok:
        lines.append(
            f"response tokens (median): full {tok['full']['median']:.0f}, coreset {tok['coreset']['median']:.0f}"
        )
    if selection.timings:
        parts = ", ".join(f"{k} {v:.1f}s" for k, v in selection.timings.items())
        lines.append(f"time: {parts}")
    return "\n".join(lines)
