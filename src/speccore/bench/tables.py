"""``results.csv`` and the Markdown tables: Table-1 style results (method × pruning rate, mean ±
std over seeds, best in bold, second underlined) and a Table-2 style selection-overhead table.

A method trained on part of the response tokens (``token_keep`` < 1) is a row of its own,
labelled ``staff +tok0.6``, next to the sample-level ``staff`` row.

Everything here works from the rows of ``results.csv`` alone, so tables can be rebuilt from a
results file without the cells that made it.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_open

FULL = "full"
ZERO_SHOT = "zero-shot"
REFERENCE_LABELS = {ZERO_SHOT: "zero-shot (no fine-tuning)", FULL: "full data (p = 0)"}
METRICS = {"rougeL": "ROUGE-L (F1 × 100)", "bleu4": "BLEU-4"}
BASE_COLUMNS = [
    "method",
    "prune_rate",
    "seed",
    "coreset_size",
    "n_train",
    "n_eval",
    "rougeL",
    "rougeL_lo",
    "rougeL_hi",
    "bleu4",
    "bleu4_lo",
    "bleu4_hi",
    "select_s",
]
TAIL_COLUMNS = ["train_s", "eval_s", "agreement", "rand_index"]
COMPUTE_KEYS = ("select_s", "train_s", "eval_s")
# Written when the rows have them (every bench row does; a results.csv from before token
# selection does not, and reads and writes back unchanged).
TOKEN_COLUMNS = {"token_keep": "prune_rate", "kept_token_fraction": "rand_index"}
STAGE_PREFIX, STAGE_SUFFIX = "sel_", "_s"
_TEXT_COLUMNS = {"method"}


# ---------------------------------------------------------------------------------------------
# results.csv
# ---------------------------------------------------------------------------------------------


def stage_column(stage: str) -> str:
    """CSV column of a selection stage: ``small fine-tune`` → ``sel_small_fine-tune_s``."""
    text = stage.lower().replace("+", " plus ")
    slug = "".join(c if c.isalnum() or c == "-" else "_" for c in text)
    return STAGE_PREFIX + "_".join(p for p in slug.split("_") if p) + STAGE_SUFFIX


def stage_label(column: str) -> str:
    return column[len(STAGE_PREFIX) : -len(STAGE_SUFFIX)].replace("_", " ")


def columns_for(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Fixed columns, then every stage column any row has (in order of first appearance,
    which is the order the stages ran in), then the tail; ``token_keep`` after
    ``prune_rate`` and ``kept_token_fraction`` last, when the rows have them."""
    stages = dict.fromkeys(k for r in rows for k in r if k.startswith(STAGE_PREFIX))
    columns = BASE_COLUMNS + list(stages) + TAIL_COLUMNS
    for column, after in TOKEN_COLUMNS.items():
        if any(column in r for r in rows):
            columns.insert(columns.index(after) + 1, column)
    return columns


def write_results_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """One line per cell, atomically; missing values are empty cells."""
    columns = columns_for(rows)
    with atomic_open(path) as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_value(row.get(c)) for c in columns])


def _csv_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e-3 else f"{value:.6f}".rstrip("0").rstrip(".")
    return str(value)


def read_results_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``results.csv``: numbers as floats (``seed`` as int), empty cells as None."""
    with open(path, encoding="utf-8", newline="") as f:
        return [_parse_row(row) for row in csv.DictReader(f)]


def _parse_row(row: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, text in row.items():
        if key in _TEXT_COLUMNS:
            out[key] = text
        elif text == "":
            out[key] = None
        elif key == "seed":
            out[key] = int(float(text))
        else:
            out[key] = float(text)
    return out


# ---------------------------------------------------------------------------------------------
# Table 1: metric by method and pruning rate
# ---------------------------------------------------------------------------------------------


def render_tables(rows: Sequence[dict[str, Any]], title: str = "Bench results") -> str:
    """The whole ``table.md``: one results block per metric, agreement, then the overhead."""
    parts = [f"# {title}", ""]
    for metric, label in METRICS.items():
        parts += [f"## {label}", "", metric_table(rows, metric), ""]
    agreement = agreement_table(rows)
    if agreement:
        parts += ["## Small/target agreement (STAFF)", "", agreement, ""]
    parts += ["## Selection overhead (seconds)", "", overhead_table(rows), ""]
    parts += [compute_line(rows), ""]
    return "\n".join(parts)


def compute_line(rows: Sequence[dict[str, Any]]) -> str:
    """The bench's compute in one line: selection + fine-tune + evaluation seconds summed over
    the cells (an interrupted and resumed bench adds up the same way)."""
    parts = {key: sum(float(r.get(key) or 0.0) for r in rows) for key in COMPUTE_KEYS}
    total = sum(parts.values())
    return (
        f"_Compute: {len(rows)} cells, selection {parts['select_s']:.0f} s + fine-tune "
        f"{parts['train_s']:.0f} s + evaluation {parts['eval_s']:.0f} s = {total:.0f} s "
        f"({total / 60:.1f} min); model loads and tokenisation not included._"
    )


def row_label(row: dict[str, Any]) -> str:
    """The method row a result belongs to: its method, plus ``+tok<keep>`` when it trained on
    part of the response tokens (``staff +tok0.6``)."""
    keep = row.get("token_keep")
    if keep is None or float(keep) >= 1:
        return str(row["method"])
    return f"{row['method']} +tok{float(keep):g}"


def methods_in_order(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Method rows (:func:`row_label`) in order of first appearance, reference rows left out."""
    seen: dict[str, None] = {}
    for r in rows:
        if r["method"] not in REFERENCE_LABELS:
            seen.setdefault(row_label(r), None)
    return list(seen)


def prune_rates_in(rows: Iterable[dict[str, Any]]) -> list[float]:
    return sorted({float(r["prune_rate"]) for r in rows if r["method"] not in REFERENCE_LABELS})


def metric_table(rows: Sequence[dict[str, Any]], metric: str) -> str:
    """Methods × pruning rates; mean ± std over seeds, bootstrap interval in brackets; per
    column the best method in bold and the second underlined (reference rows not ranked)."""
    rates = prune_rates_in(rows)
    methods = methods_in_order(rows)
    header = ["method", "reference", *[f"p = {p:g}" for p in rates]]
    lines = [_md_row(header), _md_row(["---"] * len(header))]
    for ref, label in REFERENCE_LABELS.items():
        group = [r for r in rows if r["method"] == ref]
        if group:
            lines.append(_md_row([label, format_value(group, metric), *[""] * len(rates)]))
    means = {
        (m, p): _mean([r[metric] for r in _cell_rows(rows, m, p)]) for m in methods for p in rates
    }
    ranks = {p: rank_marks({m: means[(m, p)] for m in methods}) for p in rates}
    for m in methods:
        cells = [format_value(_cell_rows(rows, m, p), metric, ranks[p].get(m)) for p in rates]
        lines.append(_md_row([m, "", *cells]))
    n_seeds = max((len(_cell_rows(rows, m, p)) for m in methods for p in rates), default=1)
    return "\n".join(lines) + "\n\n" + _table1_note(n_seeds)


def _table1_note(n_seeds: int) -> str:
    spread = f"mean ± std over {n_seeds} seeds" if n_seeds > 1 else "one seed"
    return (
        f"_{spread}; [lo, hi]: bootstrap 95% interval over the evaluation samples (averaged "
        "over seeds); per pruning rate **best** and <u>second</u> among selection methods._"
    )


def _cell_rows(rows: Sequence[dict[str, Any]], label: str, rate: float) -> list[dict[str, Any]]:
    """The rows (one per seed) of method row ``label`` at pruning rate ``rate``."""
    return [
        r
        for r in rows
        if row_label(r) == label and math.isclose(float(r["prune_rate"]), rate, abs_tol=1e-9)
    ]


def rank_marks(means: dict[str, float | None], decimals: int = 2) -> dict[str, str]:
    """``best``/``second`` per method by mean (ties, after rounding, share a mark)."""
    values = {
        m: round(v, decimals) for m, v in means.items() if v is not None and not math.isnan(v)
    }
    distinct = sorted(set(values.values()), reverse=True)
    marks: dict[str, str] = {}
    for m, v in values.items():
        if v == distinct[0]:
            marks[m] = "best"
        elif len(distinct) > 1 and v == distinct[1]:
            marks[m] = "second"
    return marks


def format_value(group: Sequence[dict[str, Any]], metric: str, mark: str | None = None) -> str:
    """``mean ± std [lo, hi]`` (no ± with one seed), emphasised as ``mark`` says."""
    values = [r[metric] for r in group if r.get(metric) is not None]
    if not values:
        return "—"
    mean = float(np.mean(values))
    text = f"{mean:.2f}"
    if len(values) > 1:
        text += f" ± {float(np.std(values, ddof=1)):.2f}"
    if mark == "best":
        text = f"**{text}**"
    elif mark == "second":
        text = f"<u>{text}</u>"
    lo = _mean([r.get(f"{metric}_lo") for r in group])
    hi = _mean([r.get(f"{metric}_hi") for r in group])
    if lo is not None and hi is not None:
        text += f" [{lo:.1f}, {hi:.1f}]"
    return text


def _mean(values: Iterable[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(vals)) if vals else None


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


# ---------------------------------------------------------------------------------------------
# Agreement and Table 2: overhead
# ---------------------------------------------------------------------------------------------


def agreement_table(rows: Sequence[dict[str, Any]]) -> str:
    """Spearman (small vs target effort on the verified samples) and the Rand index of the
    regions each induces, per pruning rate, mean over seeds; empty without STAFF rows."""
    staff = [r for r in rows if r["method"] == "staff" and r.get("agreement") is not None]
    if not staff:
        return ""
    lines = [_md_row(["p", "Spearman", "Rand index", "seeds"]), _md_row(["---"] * 4)]
    for p in prune_rates_in(staff):
        # STAFF's token cells repeat the sample selection (and its agreement) of their seed:
        # one row per seed.
        by_seed = {
            r["seed"]: r
            for r in reversed(staff)
            if math.isclose(float(r["prune_rate"]), p, abs_tol=1e-9)
        }
        group = list(by_seed.values())
        rho, rand = _mean(r["agreement"] for r in group), _mean(r.get("rand_index") for r in group)
        lines.append(
            _md_row(
                [
                    f"{p:g}",
                    _num(rho, 3),
                    _num(rand, 3) if rand is not None else "—",
                    str(len(group)),
                ]
            )
        )
    return "\n".join(lines)


def overhead_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per method: the stage times of its costliest selection (the cell that computed what
    later cells took from the cache), then mean target fine-tune and evaluation times."""
    stages = [c for c in columns_for(rows) if c.startswith(STAGE_PREFIX)]
    header = [
        "method",
        *[stage_label(c) for c in stages],
        "selection total",
        "coreset fine-tune",
        "evaluation",
    ]
    lines = [_md_row(header), _md_row(["---"] * len(header))]
    order = [m for m in REFERENCE_LABELS if any(r["method"] == m for r in rows)]
    for method in order + methods_in_order(rows):
        group = [r for r in rows if row_label(r) == method]
        cold = max(group, key=lambda r: r.get("select_s") or 0.0)
        selected = method not in REFERENCE_LABELS
        stage_cells = [_num(cold.get(c), 1) if selected else "—" for c in stages]
        lines.append(
            _md_row(
                [
                    REFERENCE_LABELS.get(method, method),
                    *stage_cells,
                    _num(cold.get("select_s"), 1) if selected else "—",
                    _num(_mean(r.get("train_s") for r in group), 1),
                    _num(_mean(r.get("eval_s") for r in group), 1),
                ]
            )
        )
    note = (
        "_Selection stages: exclusive wall seconds of the method's costliest cell (the one that "
        "filled the cache; later cells reuse its adapters and scores). With `share_cache: true` "
        "a stage shared by several methods (e.g. the tuned target of GraNd/EL2N/CCS/D2) shows "
        "only where it was first computed; `share_cache: false` gives each method its cold "
        "cost. Coreset fine-tune (the target trained on the cell's coreset) and evaluation: "
        "mean over the method's cells._"
    )
    return "\n".join(lines) + "\n\n" + note


def _num(value: Any, decimals: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{float(value):.{decimals}f}"
