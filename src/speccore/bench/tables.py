"""``results.csv`` and the Markdown tables: a verdict, Table-1 style results (method × pruning
rate, mean ± std over seeds) with a "Δ vs random" block per metric, and a Table-2 style
selection-overhead table.

With paired comparisons (:mod:`speccore.bench.paired`), a column's best method is bold only when
it is significantly ahead of the runner-up; otherwise the table names the tied leaders. Without
them (a ``results.csv`` alone, or cells written before per-row values existed) the ranking is by
mean and says it is untested. Missing metrics (e.g. the reference NLL of older cells) show "—".

A method trained on part of the response tokens (``token_keep`` < 1) is a row of its own,
labelled ``staff +tok0.6``, next to the sample-level ``staff`` row.

Everything here works from the rows of ``results.csv`` alone, so tables can be rebuilt from a
results file without the cells that made it.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..utils.io import atomic_open
from .labels import (  # noqa: F401  (re-exported: the tables' vocabulary)
    FULL,
    LOWER_IS_BETTER,
    METRICS,
    RANDOM,
    REFERENCE_LABELS,
    SHORT_NAMES,
    VARIANT_KIND,
    ZERO_SHOT,
    higher_is_better,
    order_by_mean,
    row_label,
)
from .seeds import min_p_value, seeds_needed

if TYPE_CHECKING:
    from .paired import PairedDiff

_DECIMALS = {"nll": (3, 3)}
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
# eval_s: generation and its metrics; nll_s: the reference NLL (a results.csv from before
# nll_s counted it in neither, and reads and writes back unchanged).
COMPUTE_KEYS = ("select_s", "train_s", "nll_s", "eval_s")
# Written when the rows have them (every bench row does; a results.csv from before token
# selection does not, and reads and writes back unchanged).
TOKEN_COLUMNS = {"token_keep": "prune_rate", "kept_token_fraction": "rand_index"}
# Written after BLEU when any row has a reference NLL (a bench from before it has none).
NLL_COLUMNS = ["nll", "nll_lo", "nll_hi", "n_nll"]
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
    ``prune_rate`` and ``kept_token_fraction`` last, when the rows have them; the reference
    NLL columns after BLEU when a row has a value."""
    stages = dict.fromkeys(k for r in rows for k in r if k.startswith(STAGE_PREFIX))
    columns = BASE_COLUMNS + list(stages) + TAIL_COLUMNS
    if any(r.get(c) is not None for r in rows for c in NLL_COLUMNS):
        at = columns.index("bleu4_hi") + 1
        columns[at:at] = NLL_COLUMNS
    if any("nll_s" in r for r in rows):
        columns.insert(columns.index("train_s") + 1, "nll_s")
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


def render_tables(
    rows: Sequence[dict[str, Any]],
    title: str = "Bench results",
    comparisons: Sequence[PairedDiff] | None = None,
    selection_seeds: str = "shared",
    note: str | None = None,
) -> str:
    """The whole ``table.md``: the verdict, per metric its results table and its "Δ vs random"
    block, then agreement and the overhead.

    ``comparisons``: the bench's paired differences (:func:`speccore.bench.paired.compare_cells`
    or a ``paired.csv``); without them the tables rank by mean and say it is untested.
    ``selection_seeds``: the bench's setting, for the sources of variance the verdict names;
    ``note``: a line under the title (e.g. that some cells are stale).
    """
    parts = [f"# {title}", ""] + ([note, ""] if note else [])
    parts += ["## Verdict", "", verdict(rows, comparisons, selection_seeds), ""]
    for metric, label in METRICS.items():
        if not _has(rows, metric) and not _any_for(comparisons, metric):
            why = (
                "_No cell has a reference NLL (cells made before it)._"
                if metric == "nll"
                else "_No cell generated text (`metrics.generate_rows: 0`: reference NLL only)._"
            )
            parts += [f"## {label}", "", why, ""]
            continue
        parts += [f"## {label}", "", metric_table(rows, metric, comparisons), ""]
        if comparisons is not None:
            parts += [
                f"### Δ vs random: {SHORT_NAMES[metric]}",
                "",
                delta_table(rows, comparisons, metric),
                "",
            ]
    variants = variant_table(comparisons or [])
    if variants:
        parts += ["## Variants vs their method", "", variants, ""]
    agreement = agreement_table(rows)
    if agreement:
        parts += ["## Small/target agreement", "", agreement, ""]
    parts += ["## Selection overhead (seconds)", "", overhead_table(rows), ""]
    parts += [compute_line(rows), ""]
    return "\n".join(parts)


def compute_line(rows: Sequence[dict[str, Any]]) -> str:
    """The bench's compute in one line: selection + fine-tune + reference NLL + generation
    seconds summed over the cells (an interrupted and resumed bench adds up the same way)."""
    parts = {key: sum(float(r.get(key) or 0.0) for r in rows) for key in COMPUTE_KEYS}
    total = sum(parts.values())
    return (
        f"_Compute: {len(rows)} cells, selection {parts['select_s']:.0f} s + fine-tune "
        f"{parts['train_s']:.0f} s + reference NLL {parts['nll_s']:.0f} s + generation "
        f"{parts['eval_s']:.0f} s = {total:.0f} s ({total / 60:.1f} min); model loads and "
        "tokenisation not included._"
    )


def methods_in_order(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Method rows (:func:`row_label`) in order of first appearance, reference rows left out."""
    seen: dict[str, None] = {}
    for r in rows:
        if r["method"] not in REFERENCE_LABELS:
            seen.setdefault(row_label(r), None)
    return list(seen)


def prune_rates_in(rows: Iterable[dict[str, Any]]) -> list[float]:
    return sorted({float(r["prune_rate"]) for r in rows if r["method"] not in REFERENCE_LABELS})


def metric_table(
    rows: Sequence[dict[str, Any]],
    metric: str,
    comparisons: Sequence[PairedDiff] | None = None,
) -> str:
    """Methods × pruning rates; mean ± std over seeds, bootstrap interval in brackets.

    Without ``comparisons``: per column the best method by mean in bold and the second
    underlined, said to be untested. With them: the best is bold (and the second underlined)
    only when the paired test puts it significantly ahead of the second; otherwise a line
    under the table names the leaders that are tied. Reference rows are never ranked.
    """
    rates = prune_rates_in(rows)
    methods = methods_in_order(rows)
    header = ["method", "reference", *[f"p = {p:g}" for p in rates]]
    lines = [_md_row(header), _md_row(["---"] * len(header))]
    for ref, label in REFERENCE_LABELS.items():
        group = [r for r in rows if r["method"] == ref]
        if group:
            lines.append(_md_row([label, format_value(group, metric), *[""] * len(rates)]))
    up = higher_is_better(metric)
    marks: dict[float, dict[str, str]] = {}
    leaders: list[str] = []
    for p in rates:
        means = {m: _mean(r.get(metric) for r in _cell_rows(rows, m, p)) for m in methods}
        if comparisons is None:
            marks[p] = rank_marks(means, _DECIMALS.get(metric, (2, 1))[0], up)
        else:
            marks[p], line = tested_marks(comparisons, metric, p, order_by_mean(means, up))
            leaders += [line] if line else []
    for m in methods:
        cells = [format_value(_cell_rows(rows, m, p), metric, marks[p].get(m)) for p in rates]
        lines.append(_md_row([m, "", *cells]))
    n_seeds = max(
        (
            sum(r.get(metric) is not None for r in _cell_rows(rows, m, p))
            for m in methods
            for p in rates
        ),
        default=1,
    )
    note = _table1_note(max(1, n_seeds), tested=comparisons is not None)
    return "\n".join(lines) + "\n\n" + "\n".join([note, *(f"- {x}" for x in leaders)])


def tested_marks(
    comparisons: Sequence[PairedDiff], metric: str, rate: float, order: list[str]
) -> tuple[dict[str, str], str]:
    """Marks of one column from the paired test of its two leaders (``order``: best first),
    and the line that says what the test found ("" with fewer than two methods)."""
    if len(order) < 2:
        return {}, ""
    best, second = order[0], order[1]
    head = f"p = {rate:g}:"
    d = find_diff(comparisons, metric, rate, best, second)
    if d is None or math.isnan(d.seed_p):
        return {}, f"{head} leaders {best}, {second} not tested (no paired per-row values)."
    if d.better:
        return (
            {best: "best", second: "second"},
            f"{head} **{best}** significantly ahead of {second}: {format_diff(d)}.",
        )
    tied = [best] + [
        m
        for m in order[1:]
        if (x := find_diff(comparisons, metric, rate, m, best)) is not None and not x.significant
    ]
    return {}, f"{head} leaders tied ({', '.join(tied)}); {best} − {second}: {format_diff(d)}."


def find_diff(
    comparisons: Sequence[PairedDiff], metric: str, rate: float, method: str, baseline: str
) -> PairedDiff | None:
    """The paired difference ``method`` − ``baseline``, also from a stored ``baseline`` −
    ``method`` (negated); None if neither was computed."""
    for d in comparisons:
        if d.metric != metric or not math.isclose(d.prune_rate, rate, abs_tol=1e-9):
            continue
        if (d.method, d.baseline) == (method, baseline):
            return d
    for d in comparisons:
        if d.metric != metric or not math.isclose(d.prune_rate, rate, abs_tol=1e-9):
            continue
        if (d.method, d.baseline) == (baseline, method):
            return dataclasses.replace(
                d,
                method=method,
                baseline=baseline,
                delta=-d.delta,
                lo=-d.hi,
                hi=-d.lo,
                per_seed=tuple(-x for x in d.per_seed),
                seed_lo=-d.seed_hi,
                seed_hi=-d.seed_lo,
            )
    return None


def _table1_note(n_seeds: int, tested: bool = False) -> str:
    spread = f"mean ± std over {n_seeds} seeds" if n_seeds > 1 else "one seed"
    head = (
        f"_{spread}; [lo, hi]: bootstrap 95% interval over the evaluation samples (averaged "
        "over seeds); "
    )
    if not tested:
        return head + (
            "per pruning rate **best** and <u>second</u> among selection methods by mean "
            "(not tested: no paired comparisons)._"
        )
    return head + (
        "per pruning rate **best** (and <u>second</u>) only where the seed-level test "
        "(sign-flip over seeds, Holm-corrected over the leaders' comparisons) puts the best "
        "significantly ahead of the second, otherwise the leaders are tied:_"
    )


def _cell_rows(rows: Sequence[dict[str, Any]], label: str, rate: float) -> list[dict[str, Any]]:
    """The rows (one per seed) of method row ``label`` at pruning rate ``rate``."""
    return [
        r
        for r in rows
        if row_label(r) == label and math.isclose(float(r["prune_rate"]), rate, abs_tol=1e-9)
    ]


def rank_marks(
    means: dict[str, float | None], decimals: int = 2, higher_is_better: bool = True
) -> dict[str, str]:
    """``best``/``second`` per method by mean (ties, after rounding, share a mark)."""
    values = {
        m: round(v, decimals) for m, v in means.items() if v is not None and not math.isnan(v)
    }
    distinct = sorted(set(values.values()), reverse=higher_is_better)
    marks: dict[str, str] = {}
    for m, v in values.items():
        if v == distinct[0]:
            marks[m] = "best"
        elif len(distinct) > 1 and v == distinct[1]:
            marks[m] = "second"
    return marks


def format_value(group: Sequence[dict[str, Any]], metric: str, mark: str | None = None) -> str:
    """``mean ± std [lo, hi]`` (no ± with one seed), emphasised as ``mark`` says; "—" when no
    row has the metric."""
    values = [r[metric] for r in group if r.get(metric) is not None]
    if not values:
        return "—"
    digits, interval_digits = _DECIMALS.get(metric, (2, 1))
    mean = float(np.mean(values))
    text = f"{mean:.{digits}f}"
    if len(values) > 1:
        text += f" ± {float(np.std(values, ddof=1)):.{digits}f}"
    if mark == "best":
        text = f"**{text}**"
    elif mark == "second":
        text = f"<u>{text}</u>"
    lo = _mean([r.get(f"{metric}_lo") for r in group])
    hi = _mean([r.get(f"{metric}_hi") for r in group])
    if lo is not None and hi is not None:
        text += f" [{lo:.{interval_digits}f}, {hi:.{interval_digits}f}]"
    return text


def _mean(values: Iterable[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(vals)) if vals else None


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _has(rows: Sequence[dict[str, Any]], metric: str) -> bool:
    return any(r.get(metric) is not None for r in rows)


def _any_for(comparisons: Sequence[PairedDiff] | None, metric: str) -> bool:
    return any(d.metric == metric for d in comparisons or ())


# ---------------------------------------------------------------------------------------------
# Paired differences: the "Δ vs random" blocks and the verdict
# ---------------------------------------------------------------------------------------------

BETTER_MARK, WORSE_MARK = "▲", "▼"
#: ``selection_seeds`` of a bench: what the training seed varies besides the target's fine-tune.
VARIANCE_SOURCES = {
    "shared": (
        "the target's fine-tune (LoRA initialisation, data order) and the selection's random "
        "draws; the selection's own fine-tunes (small model, tuned target of GraNd/EL2N/CCS, "
        "verification LoRA) are one per method, shared by every seed (`selection_seeds: "
        "shared`), so the verdict holds for those fine-tunes only"
    ),
    "per_seed": (
        "the target's fine-tune (LoRA initialisation, data order), the selection's random "
        "draws and its own fine-tunes (small model, tuned target of GraNd/EL2N/CCS, "
        "verification LoRA), each seeded with the cell's seed (`selection_seeds: per_seed`)"
    ),
}


def _signed(value: float, digits: int) -> str:
    if math.isinf(value):
        return "+∞" if value > 0 else "−∞"
    return f"{value:+.{digits}f}"


def format_diff(d: PairedDiff, seed_std: bool = False) -> str:
    """The seed-level result: ``+1.23 [+0.40, +2.05], p-value 0.004 (Holm 0.02)`` (with
    ``seed_std``: ``+1.23 ± 0.80 [...]``); an interval with infinite ends is what too few
    seeds give. Without a seed-level test, the delta alone."""
    digits = _DECIMALS.get(d.metric, (2, 1))[0]
    text = f"{d.delta:+.{digits}f}"
    if seed_std and d.seed_std is not None:
        text += f" ± {d.seed_std:.{digits}f}"
    if not math.isnan(d.seed_p):
        text += f" [{_signed(d.seed_lo, digits)}, {_signed(d.seed_hi, digits)}], "
        text += format_p(d.seed_p)
        if not math.isnan(d.p_holm) and d.p_holm != d.seed_p:
            text += f" (Holm {format_p(d.p_holm).removeprefix('p-value ')})"
    return text


def format_per_seed(d: PairedDiff) -> str:
    """The per-seed differences, in seed order: ``−0.028, +0.007, +0.083``."""
    digits = _DECIMALS.get(d.metric, (2, 1))[0]
    return ", ".join(_signed(x, digits) for x in d.per_seed) or "—"


def format_rows_interval(d: PairedDiff) -> str:
    """The row bootstrap with the trained models held fixed: ``[+0.016, +0.026], p-value
    0.002`` (secondary: it leaves the seed-to-seed variance out)."""
    if math.isnan(d.lo):
        return "—"
    digits = _DECIMALS.get(d.metric, (2, 1))[0]
    return f"[{d.lo:+.{digits}f}, {d.hi:+.{digits}f}], {format_p(d.p)}"


def format_p(p: float) -> str:
    """``p-value 0.004`` (spelled out: ``p = 0.9`` is a pruning rate in these tables)."""
    if math.isnan(p):
        return "p-value —"
    return "p-value < 0.001" if p < 0.001 else f"p-value {p:.3f}".rstrip("0").rstrip(".")


COMPARISON_HEADER = [
    "p",
    "Δ [95% over seeds], p-value (Holm)",
    "per-seed Δ",
    "models fixed: [95% over rows], p-value",
]


def _comparison_line(label: str, d: PairedDiff) -> str:
    mark = f" {BETTER_MARK}" if d.better else f" {WORSE_MARK}" if d.worse else ""
    return _md_row(
        [
            label,
            f"{d.prune_rate:g}",
            format_diff(d, seed_std=True) + mark,
            format_per_seed(d),
            format_rows_interval(d),
        ]
    )


def delta_table(
    rows: Sequence[dict[str, Any]], comparisons: Sequence[PairedDiff], metric: str
) -> str:
    """One line per (method, pruning rate): method − random over seeds (mean ± seed std, the
    sign-flip interval and p-value, Holm-adjusted), the per-seed differences, and the row
    bootstrap with the models fixed; ▲/▼ only where the Holm-adjusted p clears the level."""
    rates = prune_rates_in(rows)
    methods = [m for m in methods_in_order(rows) if m != RANDOM]
    found = [
        d
        for m in methods
        for p in rates
        if (d := find_diff(comparisons, metric, p, m, RANDOM)) is not None
    ]
    if not found:
        return (
            "_No paired difference with random: no random cells, or the cells carry no "
            "values of this metric._"
        )
    header = ["method − random", *COMPARISON_HEADER]
    lines = [_md_row(header), _md_row(["---"] * len(header))]
    lines += [_comparison_line(d.method, d) for d in found]
    return "\n".join(lines) + "\n\n" + _delta_note(found, metric, comparisons)


def _delta_note(found: Sequence[PairedDiff], metric: str, comparisons: Sequence[PairedDiff]) -> str:
    seeds = _plural(_span(d.n_seeds for d in found), "seed")
    level = f"{100 * found[0].confidence:g}%"
    alpha = f"{1 - found[0].confidence:g}"
    direction = (
        "lower is better: ▲ marks a significantly lower NLL than random"
        if not higher_is_better(metric)
        else "▲ better / ▼ worse than random"
    )
    rows_note = (
        f"{_span(d.resamples for d in found)} resamples of the "
        f"{_span(d.n_rows for d in found)} evaluation rows"
        if not all(math.isnan(d.lo) for d in found)
        else "not available"
    )
    return (
        f"_Δ = method − random, mean over the {seeds} both ran ± the seed-to-seed std; "
        f"[lo, hi]: {level} interval over training seeds (the exact sign-flip test on the "
        "per-seed differences, inverted; ±∞ where the seeds are too few for that level); "
        f"p-value: that test, and in brackets Holm-adjusted over the "
        f"{family_size(comparisons)} comparisons of this table; {direction}, only where the "
        f"Holm-adjusted p-value is ≤ {alpha}. Models fixed: paired bootstrap over rows with the "
        f"trained models held fixed ({rows_note}), which leaves the seed-to-seed variance out "
        "and marks nothing._"
    )


def variant_table(comparisons: Sequence[PairedDiff]) -> str:
    """Each variant − the method it varies (``staff-derived − staff``: another small model),
    per pruning rate and metric, tested over seeds like the "Δ vs random" blocks; empty
    without variants."""
    found = [d for d in comparisons if d.kind == VARIANT_KIND]
    if not found:
        return ""
    header = ["variant − method", "metric", *COMPARISON_HEADER]
    lines = [_md_row(header), _md_row(["---"] * len(header))]
    for metric in METRICS:
        for d in (d for d in found if d.metric == metric):
            line = _comparison_line(f"{d.method} − {d.baseline}", d)
            lines.append(line.replace(" | ", f" | {SHORT_NAMES[metric]} | ", 1))
    seeds = _plural(_span(d.n_seeds for d in found), "seed")
    note = (
        f"_Δ = variant − its method on the same evaluation rows, mean over the {seeds} both "
        f"ran ± the seed-to-seed std; tested over seeds like the Δ vs random blocks (sign-flip, "
        f"Holm-adjusted with them); ▲ better / ▼ worse (reference NLL: lower is better)._"
    )
    return "\n".join(lines) + "\n\n" + note


def family_size(diffs: Sequence[PairedDiff], kinds: Iterable[str] = (RANDOM, VARIANT_KIND)) -> int:
    """How many tested comparisons Holm corrected together in the family of ``kinds``
    (default: the markable ones, against random and variants against their method)."""
    wanted = set(kinds)
    return sum(d.kind in wanted and not math.isnan(d.seed_p) for d in diffs)


def _span(values: Iterable[int]) -> str:
    vals = sorted(set(values))
    return str(vals[0]) if len(vals) == 1 else f"{vals[0]}-{vals[-1]}"


def verdict(
    rows: Sequence[dict[str, Any]],
    comparisons: Sequence[PairedDiff] | None,
    selection_seeds: str = "shared",
) -> str:
    """One paragraph: the test, what it covers, and which methods beat random (or are worse)
    on which metric at which pruning rate; or that the seeds are too few to mark anything."""
    if comparisons is None:
        return (
            "No paired comparisons: the rankings below are by mean only and not tested "
            "(rebuild the tables from the bench's cells to get them)."
        )
    if not any(r["method"] == RANDOM for r in rows):
        return "No `random` cells: nothing to compare the selection methods against."
    vs_random = [d for d in comparisons if d.baseline == RANDOM and d.kind == RANDOM]
    if not vs_random:
        return "No paired comparison with random: the cells carry no values to compare."
    family = family_size(comparisons)
    if family == 0:
        return (
            "No seed-level test: the comparisons carry no per-seed differences (a paired.csv "
            "from before them); rebuild the tables from the cells or from results.csv."
        )
    alpha = 1 - vs_random[0].confidence
    head = (
        f"Tested over training seeds ({_plural(_span(d.n_seeds for d in vs_random), 'seed')}"
        f"; {_rows_text(vs_random)} held fixed): an exact sign-flip test on each comparison's "
        f"per-seed differences, Holm-corrected at {alpha:g} over the {family} comparisons "
        "with random and of variants with their method. Seeds vary "
        f"{VARIANCE_SOURCES.get(selection_seeds, selection_seeds)}."
    )
    most = max(d.n_seeds for d in vs_random)
    needed = seeds_needed(alpha / max(1, family))
    if most < needed:
        return (
            f"{head} **Too few seeds for a verdict**: with {most} seeds the smallest p-value "
            f"the test can give is {min_p_value(most):.3g} (2/2^{most}); Holm's first step "
            f"needs ≤ {alpha / max(1, family):.2g} ({alpha:g}/{family}), which takes at least "
            f"{needed} seeds. Nothing is marked; the Δ blocks show each difference and its "
            "per-seed values."
        )
    sentences = []
    for rate in prune_rates_in(rows):
        found = []
        for m in methods_in_order(rows):
            here = [find_diff(vs_random, metric, rate, m, RANDOM) for metric in METRICS]
            text = _method_verdict(m, [d for d in here if d is not None])
            found += [text] if text else []
        if found:
            sentences.append(f"at p = {rate:g}, " + "; ".join(found) + ".")
        else:
            sentences.append(f"at p = {rate:g}, no method differs significantly from random.")
    tail = "Every other difference is within seed-to-seed noise."
    return " ".join([head, *_capitalised(sentences), tail])


def _method_verdict(method: str, diffs: Sequence[PairedDiff]) -> str:
    better = [d for d in diffs if d.better]
    worse = [d for d in diffs if d.worse]
    if better and worse:
        return f"{method} beats random on {_listed(better)} but is worse on {_listed(worse)}"
    if better:
        return f"{method} beats random on {_listed(better)}"
    if worse:
        return f"{method} is worse than random on {_listed(worse)}"
    return ""


def _listed(diffs: Sequence[PairedDiff]) -> str:
    parts = [f"{SHORT_NAMES.get(d.metric, d.metric)} ({format_diff(d)})" for d in diffs]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _rows_text(diffs: Sequence[PairedDiff]) -> str:
    present = {
        m: _span(d.n_rows for d in diffs if d.metric == m)
        for m in METRICS
        if any(d.metric == m for d in diffs)
    }
    if len(set(present.values())) == 1:
        return f"{next(iter(present.values()))} evaluation rows"
    return "evaluation rows: " + ", ".join(f"{SHORT_NAMES[m]} {n}" for m, n in present.items())


def _plural(count: str, noun: str) -> str:
    return f"{count} {noun}" if count == "1" else f"{count} {noun}s"


def _capitalised(sentences: Sequence[str]) -> list[str]:
    return [s[0].upper() + s[1:] for s in sentences]


# ---------------------------------------------------------------------------------------------
# Agreement and Table 2: overhead
# ---------------------------------------------------------------------------------------------


def agreement_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per method row with a small model (STAFF and its variants, e.g. another small model) and
    pruning rate: Spearman (small vs target effort on the verified samples) and the Rand index
    of the regions each induces, mean over seeds; empty without such rows."""
    measured = [r for r in rows if r.get("agreement") is not None]
    if not measured:
        return ""
    header = ["method", "p", "Spearman", "Rand index", "seeds"]
    lines = [_md_row(header), _md_row(["---"] * len(header))]
    for method in dict.fromkeys(str(r["method"]) for r in measured):
        mine = [r for r in measured if r["method"] == method]
        for p in prune_rates_in(mine):
            # Token cells repeat the sample selection (and its agreement) of their seed: one row
            # per seed.
            by_seed = {
                r["seed"]: r
                for r in reversed(mine)
                if math.isclose(float(r["prune_rate"]), p, abs_tol=1e-9)
            }
            group = list(by_seed.values())
            rho = _mean(r["agreement"] for r in group)
            rand = _mean(r.get("rand_index") for r in group)
            lines.append(
                _md_row(
                    [
                        method,
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
        "reference NLL",
        "generation",
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
                    _num(_mean(r.get("nll_s") for r in group), 1),
                    _num(_mean(r.get("eval_s") for r in group), 1),
                ]
            )
        )
    note = (
        "_Selection stages: exclusive wall seconds of the method's costliest cell (the one that "
        "filled the cache; later cells reuse its adapters and scores). With `share_cache: true` "
        "a stage shared by several methods (e.g. the tuned target of GraNd/EL2N/CCS/D2) shows "
        "only where it was first computed; `share_cache: false` gives each method its cold "
        "cost. Coreset fine-tune (the target trained on the cell's coreset), reference NLL and "
        "generation (with its ROUGE/BLEU scoring): mean over the method's cells._"
    )
    return "\n".join(lines) + "\n\n" + note


def _num(value: Any, decimals: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{float(value):.{decimals}f}"
