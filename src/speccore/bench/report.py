"""From finished cells to ``results.csv``, ``table.md`` and the plots."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..utils.io import atomic_open
from .metrics import MetricSettings
from .paired import (
    PairedDiff,
    compare_cells,
    read_paired_csv,
    seed_tests_from_rows,
    write_paired_csv,
)
from .tables import (
    FULL,
    ZERO_SHOT,
    read_results_csv,
    render_tables,
    stage_column,
    write_results_csv,
)

logger = logging.getLogger(__name__)


def cell_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """The ``results.csv`` row of one cell record."""
    m = record["metrics"]
    sel = record.get("selection") or {}
    row: dict[str, Any] = {
        "method": record["method"],
        "prune_rate": record["prune_rate"],
        "seed": record["seed"],
        # Cells made before token selection existed trained on every token.
        "token_keep": None if record["method"] == ZERO_SHOT else record.get("token_keep", 1.0),
        "coreset_size": record["coreset_size"],
        "n_train": record["n_train"],
        "n_eval": m.get("n_eval"),
        **{
            k: m.get(k)
            for k in (
                "rougeL",
                "rougeL_lo",
                "rougeL_hi",
                "bleu4",
                "bleu4_lo",
                "bleu4_hi",
                "nll",
                "nll_lo",
                "nll_hi",
                "n_nll",
            )
        },
        "select_s": sel.get("seconds"),
        "train_s": record.get("train_seconds"),
        # Generation and its metrics; the reference NLL is timed apart (a cell from before
        # nll_seconds has no such key, and its row no nll_s).
        **({"nll_s": record["nll_seconds"]} if "nll_seconds" in record else {}),
        "eval_s": record.get("eval_seconds"),
        "agreement": sel.get("agreement"),
        "rand_index": sel.get("rand_index"),
        "kept_token_fraction": None
        if record["method"] == ZERO_SHOT
        else record.get("kept_token_fraction", 1.0),
    }
    for stage, seconds in (sel.get("timings") or {}).items():
        row[stage_column(stage)] = seconds
    return row


def collect_rows(
    cells: Mapping[str, Mapping[str, Any]], methods: list[str] | None = None
) -> list[dict[str, Any]]:
    """Rows of every cell: zero-shot, full data, then methods (in ``methods`` order, others
    after; per method all tokens first, then decreasing token_keep), pruning rate, seed."""
    order = {m: i for i, m in enumerate([ZERO_SHOT, FULL, *(methods or [])])}

    def key(r: dict[str, Any]) -> tuple[int, str, float, float, int]:
        keep = -(r["token_keep"] if r["token_keep"] is not None else 1.0)
        return (
            order.get(r["method"], len(order)),
            r["method"],
            keep,
            r["prune_rate"],
            r["seed"] or 0,
        )

    return sorted((cell_row(c) for c in cells.values()), key=key)


def write_reports(
    folder: Path,
    cells: Mapping[str, Mapping[str, Any]],
    *,
    plots: bool = True,
    bases: Mapping[str, str] | None = None,
    note: str | None = None,
) -> list[Path]:
    """Write ``results.csv`` and ``table.md`` (and the plots) from ``cells``; returns the paths.

    ``bases``: each variant's method (:meth:`BenchConfig.variant_bases`), to compare the two;
    ``note``: a line under the table's title."""
    rows = collect_rows(cells, planned_methods(folder))
    if not rows:
        return []
    comparisons = compare_cells(cells, metric_settings(cells), bases=bases)
    return write_tables(folder, rows, comparisons, selection_seeds(cells), plots=plots, note=note)


def write_tables(
    folder: Path,
    rows: list[dict[str, Any]],
    comparisons: list[PairedDiff],
    seeds_setting: str = "shared",
    *,
    plots: bool = True,
    note: str | None = None,
) -> list[Path]:
    """``results.csv``, ``paired.csv``, ``table.md`` and the plots from rows and comparisons."""
    csv_path, table_path = folder / "results.csv", folder / "table.md"
    paired_path = folder / "paired.csv"
    write_results_csv(csv_path, rows)
    write_paired_csv(paired_path, comparisons)
    title = f"Bench results: {folder.name}"
    with atomic_open(table_path) as f:
        f.write(render_tables(rows, title, comparisons, seeds_setting, note))
    written = [csv_path, paired_path, table_path]
    if plots:
        from .plots import write_plots

        written += write_plots(folder, rows, comparisons)
    return written


def selection_seeds(cells: Mapping[str, Mapping[str, Any]]) -> str:
    """The bench's ``selection_seeds`` as its cells recorded it (cells from before the setting
    shared the selection's fine-tunes between seeds)."""
    for record in cells.values():
        value = (record.get("settings") or {}).get("selection_seeds")
        if isinstance(value, str):
            return value
    return "shared"


def tables_from_results(folder: Path, *, plots: bool = True, note: str | None = None) -> list[Path]:
    """Rewrite a bench folder's tables without its cells: rows from ``results.csv``, the
    models-fixed columns from ``paired.csv``, the seed-level tests recomputed from the rows
    (:func:`~speccore.bench.paired.seed_tests_from_rows`). For results committed without
    their cells."""
    rows = read_results_csv(folder / "results.csv")
    old = read_paired_csv(folder / "paired.csv") if (folder / "paired.csv").is_file() else []
    comparisons = seed_tests_from_rows(old, rows)
    settings: dict[str, Any] = {}
    if (folder / "bench_config.json").is_file():
        config = json.loads((folder / "bench_config.json").read_text(encoding="utf-8"))
        settings = config.get("settings") or {}
    seeds_setting = str(settings.get("selection_seeds", "shared"))
    return write_tables(folder, rows, comparisons, seeds_setting, plots=plots, note=note)


def metric_settings(cells: Mapping[str, Mapping[str, Any]]) -> MetricSettings | None:
    """The bench's metric settings (bootstrap resamples, seed), as its cells recorded them."""
    for record in cells.values():
        raw = (record.get("settings") or {}).get("metrics")
        if isinstance(raw, dict):
            names = {f.name for f in dataclasses.fields(MetricSettings)}
            return MetricSettings(**{k: v for k, v in raw.items() if k in names})
    return None


def planned_methods(folder: Path) -> list[str] | None:
    """The ``methods`` order of the bench's config, for the row order of the tables."""
    path = folder / "bench_config.json"
    if not path.is_file():
        return None
    methods = json.loads(path.read_text(encoding="utf-8")).get("methods")
    return list(methods) if isinstance(methods, list) else None
