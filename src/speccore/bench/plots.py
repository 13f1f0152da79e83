"""PNG plots of a bench (matplotlib's Agg renderer through ``Figure``, no pyplot state):

* ``<metric>_vs_prune_rate.png``: metric against pruning rate, one line per method (and per
  token_keep below 1: ``staff +tok0.6``) with its mean over seeds and the seed std as error
  bars, the full-data level as a horizontal line and zero-shot as a dotted one (the paper's
  Fig. 1a);
* ``<metric>_delta_vs_random.png``: each method − random per pruning rate with its paired
  bootstrap interval and a zero line (filled marker: the interval excludes 0), from the paired
  comparisons (:mod:`speccore.bench.paired`);
* ``staff_effort_small_vs_target.png``: small vs target effort on the same (verified) samples,
  as distributions and as a scatter (Fig. 4);
* ``staff_regions_p<rate>.png``: per region its size, budget and samples taken, and V_i
  (Fig. 3), from STAFF's region table.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..utils.io import atomic_path
from .tables import (
    FULL,
    METRICS,
    RANDOM,
    SHORT_NAMES,
    ZERO_SHOT,
    find_diff,
    higher_is_better,
    methods_in_order,
    prune_rates_in,
    row_label,
)

if TYPE_CHECKING:
    from .paired import PairedDiff

logger = logging.getLogger(__name__)

_DPI = 120


def _figure(width: float = 6.4, height: float = 4.2) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI)
    return path


def _colors(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """One colour per method row, the same in every plot of a bench."""
    return {m: f"C{i % 10}" for i, m in enumerate(methods_in_order(rows))}


def plot_metric_vs_prune(rows: Sequence[dict[str, Any]], metric: str, path: Path) -> Path:
    """Mean metric per method row (:func:`~speccore.bench.tables.row_label`) against the
    pruning rate, ± std over seeds as error bars."""
    fig = _figure()
    ax = fig.subplots()
    colors = _colors(rows)
    methods, rates = methods_in_order(rows), prune_rates_in(rows)
    # Methods shifted a little apart, so that error bars at one pruning rate do not overlap.
    span = (max(rates) - min(rates)) if len(rates) > 1 else 0.2
    n_seeds = 1
    for k, method in enumerate(methods):
        shift = (k - (len(methods) - 1) / 2) * 0.01 * span
        xs, ys, errs = [], [], []
        for p in rates:
            vals = [
                r[metric]
                for r in rows
                if row_label(r) == method
                and math.isclose(float(r["prune_rate"]), p, abs_tol=1e-9)
                and r.get(metric) is not None
            ]
            if vals:
                xs.append(p + shift)
                ys.append(float(np.mean(vals)))
                errs.append(float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0)
                n_seeds = max(n_seeds, len(vals))
        style = "-." if " +tok" in method else "-"  # token-level variants stand out
        ax.errorbar(
            xs,
            ys,
            yerr=errs,
            marker="o",
            capsize=3,
            linestyle=style,
            color=colors[method],
            label=method,
        )
    for ref, style in ((FULL, "--"), (ZERO_SHOT, ":")):
        vals = [r[metric] for r in rows if r["method"] == ref and r.get(metric) is not None]
        if vals:
            label = "full data" if ref == FULL else "zero-shot"
            ax.axhline(float(np.mean(vals)), color="black", linestyle=style, label=label)
    ax.set_xticks(rates)
    ax.set_xlabel("pruning rate p")
    ax.set_ylabel(METRICS.get(metric, metric))
    spread = f"mean of {n_seeds} seeds ± std" if n_seeds > 1 else "one seed"
    ax.set_title(f"{SHORT_NAMES.get(metric, metric)} vs pruning rate ({spread})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def plot_delta_vs_random(
    rows: Sequence[dict[str, Any]],
    comparisons: Sequence[PairedDiff],
    metric: str,
    path: Path,
) -> Path | None:
    """Each method − random per pruning rate: the per-seed differences as small dots, their
    mean with the seed-level interval (error bars where it is finite) and a zero line; the
    mean's marker is filled where the Holm-corrected seed-level test marks it. None (nothing
    written) without any such comparison."""
    rates = prune_rates_in(rows)
    methods = [m for m in methods_in_order(rows) if m != RANDOM]
    diffs = {(m, p): find_diff(comparisons, metric, p, m, RANDOM) for m in methods for p in rates}
    if not any(diffs.values()):
        return None
    colors = _colors(rows)
    fig = _figure()
    ax = fig.subplots()
    width = 0.7 / max(1, len(methods))  # methods side by side within a pruning rate
    for k, m in enumerate(methods):
        found = [(i, d) for i, p in enumerate(rates) if (d := diffs[(m, p)]) is not None]
        if not found:
            continue
        x = np.array([i for i, _ in found]) + (k - (len(methods) - 1) / 2) * width
        y = np.array([d.delta for _, d in found])
        # Too few seeds give infinite ends: no bar then (the dots show the spread).
        err = np.array(
            [
                [d.delta - d.seed_lo, d.seed_hi - d.delta]
                if np.isfinite([d.seed_lo, d.seed_hi]).all()
                else [0.0, 0.0]
                for _, d in found
            ]
        ).T
        # The error bar carries the legend entry: one per method, whatever its markers.
        ax.errorbar(x, y, yerr=err, fmt="none", ecolor=colors[m], capsize=3, label=m)
        for xi, (_, d) in zip(x, found, strict=True):
            ax.scatter([xi] * len(d.per_seed), d.per_seed, s=8, color=colors[m], alpha=0.5)
        filled = np.array([d.significant for _, d in found])
        ax.scatter(x[filled], y[filled], color=colors[m], zorder=3)
        ax.scatter(x[~filled], y[~filled], facecolors="white", edgecolors=colors[m], zorder=3)
    ax.axhline(0.0, color="black", linewidth=1)
    ax.set_xticks(range(len(rates)), [f"p = {p:g}" for p in rates])
    ax.set_xlim(-0.6, len(rates) - 0.4)
    name = SHORT_NAMES.get(metric, metric)
    better = "higher is better" if higher_is_better(metric) else "lower is better"
    ax.set_ylabel(f"Δ {name}: method − random ({better})")
    level = next(d.confidence for d in diffs.values() if d is not None)
    ax.set_title(
        f"Δ {name} vs random: per-seed differences (dots), mean and {100 * level:g}% "
        "interval over seeds\n(filled: significant after Holm)",
        fontsize="medium",
    )
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def plot_effort_histogram(
    small: np.ndarray,
    target: np.ndarray,
    path: Path,
    spearman: float | None = None,
    score: str = "effort",
) -> Path:
    """Small vs target scores on the same samples: distributions (each scaled by its mean, as
    the two models' scores live on different scales; shared bins) and a raw-value scatter."""
    small, target = np.asarray(small, dtype=np.float64), np.asarray(target, dtype=np.float64)
    fig = _figure(10, 4)
    left, right = fig.subplots(1, 2)
    scaled = [v / (v.mean() if v.mean() > 0 else 1.0) for v in (small, target)]
    edges = np.histogram_bin_edges(np.concatenate(scaled), bins=max(5, min(30, len(small) // 3)))
    for values, label in zip(
        scaled, ("small model (tuned)", "target model (untuned)"), strict=True
    ):
        left.hist(values, bins=edges, alpha=0.5, label=label)
    left.set_xlabel(f"{score} / mean {score}")
    left.set_ylabel("samples")
    left.legend()
    left.set_title(f"{score} of the {len(small)} verified samples")
    right.scatter(small, target, s=10, alpha=0.7)
    right.set_xlabel(f"small-model {score}")
    right.set_ylabel(f"target-model {score} (untuned)")
    rho = "" if spearman is None else f" (Spearman {spearman:.2f})"
    right.set_title(f"same samples{rho}")
    return _save(fig, path)


def plot_regions(region_table: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """STAFF's regions in score order: size, budget and taken as bars, V_i on a second axis."""
    table = sorted(region_table, key=lambda r: r["region"])
    x = np.arange(len(table))
    fig = _figure(max(6.4, 0.18 * len(table) + 3), 4.2)
    ax = fig.subplots()
    width = 0.27
    for k, (key, label) in enumerate(
        (("size", "size"), ("budget", "budget m_B"), ("taken", "taken"))
    ):
        ax.bar(x + (k - 1) * width, [r.get(key, 0) for r in table], width, label=label)
    ax.set_xlabel("region (by speculative score, low → high)")
    ax.set_ylabel("samples")
    ax.set_xticks(x, [str(r["region"]) for r in table], fontsize="x-small")
    twin = ax.twinx()
    twin.plot(x, [r.get("V", math.nan) for r in table], color="black", marker=".", label="V_i")
    twin.set_ylabel("V_i (target/small effort ratio, mean 1)")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    # Below the axes: inside, it hides the tallest bars or the V_i line.
    fig.legend(handles=handles, fontsize="small", loc="outside lower center", ncols=4)
    ax.set_title(title)
    return _save(fig, path)


def write_plots(
    folder: Path,
    rows: Sequence[dict[str, Any]],
    comparisons: Sequence[PairedDiff] | None = None,
) -> list[Path]:
    """Every plot the bench's finished cells allow (the Δ plots need ``comparisons``);
    returns the files written."""
    written: list[Path] = []
    if any(r["method"] not in (FULL, ZERO_SHOT) for r in rows):
        for metric in METRICS:
            if not any(r.get(metric) is not None for r in rows):
                continue  # the reference NLL of cells made before it
            written.append(
                plot_metric_vs_prune(rows, metric, folder / f"{metric}_vs_prune_rate.png")
            )
            if comparisons:
                path = folder / f"{metric}_delta_vs_random.png"
                if plot_delta_vs_random(rows, comparisons, metric, path) is not None:
                    written.append(path)
    written += _staff_plots(folder)
    return written


def _staff_plots(folder: Path) -> list[Path]:
    """Region bars for each STAFF pruning rate (first seed) and one effort comparison."""
    from ..selection.agreement import verified_scores

    written: list[Path] = []
    selections = sorted((folder / "selections").glob("staff_*.json"))
    seen_rates: set[str] = set()
    histogram_done = False
    for path in selections:
        sel = json.loads(path.read_text(encoding="utf-8"))
        rate = path.stem.split("_")[1]  # staff_p0.9_s0 → p0.9
        if rate not in seen_rates and sel.get("region_table"):
            seen_rates.add(rate)
            title = f"STAFF regions, {rate.replace('p', 'p = ', 1)} ({path.stem})"
            written.append(
                plot_regions(sel["region_table"], folder / f"staff_regions_{rate}.png", title)
            )
        small, target = verified_scores(sel)
        if not histogram_done and small is not None:
            histogram_done = True
            rho = (sel.get("info", {}).get("agreement") or {}).get("spearman")
            score = str((sel.get("config") or {}).get("score", "effort"))
            out = folder / "staff_effort_small_vs_target.png"
            written.append(plot_effort_histogram(small, target, out, rho, score))
    if selections and not histogram_done:
        logger.info(
            "no STAFF selection stores its verified samples' scores (info['agreement'] "
            "indices/small/target): skipped the small-vs-target effort plot"
        )
    return written
