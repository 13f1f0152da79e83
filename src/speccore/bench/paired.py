"""Paired differences between bench methods: does a method beat ``random`` (or the best other
method) on the same evaluation rows with the same seeds?

Two methods evaluated on the same rows share most of their noise (a hard row is hard for both),
so their per-row differences are far less noisy than two separate per-cell intervals suggest.
For a pruning rate, a metric and two method rows A and B (``staff``, ``staff +tok0.6``, ...):

* the seeds both ran, each with per-row values of the metric on the same rows, give
  ``D[s, i] = A[s, i] - B[s, i]``; ``delta`` is its mean (the mean over seeds of each seed's
  difference of means), ``seed_std`` the standard deviation over seeds of the per-seed
  difference (``None`` with one seed);
* the interval is a percentile paired bootstrap over evaluation rows: a resample draws ``n`` row
  indices with replacement and uses *the same indices for every seed and both methods*, so the
  pairing over rows and seeds is kept; ``resamples`` come from ``MetricSettings.bootstrap``,
  seeded by ``bootstrap_seed``, and every comparison with the same number of rows uses the same
  resamples;
* ``p`` is the two-sided paired bootstrap p-value of the same resamples: twice the smaller
  share of resampled differences on either side of 0, each share counted as
  ``(1 + count) / (1 + resamples)`` so that ``p >= 2 / (1 + resamples)``, capped at 1. It
  inverts the percentile interval: ``p < 1 - confidence`` exactly when the interval excludes 0
  (up to the interpolation of the percentiles), so the interval and the p-value never tell
  different stories.

ROUGE-L and the reference NLL are means over rows: a resample is a weighted mean of the
seed-averaged per-row differences (a matrix product, thousands of resamples in milliseconds).
BLEU-4 is a corpus metric: each resample sums each cell's per-row sufficient statistics
(n-gram matches and totals, lengths) over the drawn rows and recomputes corpus BLEU from the
sums (:func:`~speccore.bench.metrics.bleu_from_statistics_batch`, sacrebleu's formula
vectorised), then averages the per-seed BLEU differences.

**The verdict is seed-level.** The row intervals above describe the evaluation-row sampling
with the trained models held fixed ("models fixed" in the tables): they shrink with more rows
however few seeds ran, so they are a secondary column only. Every comparison also carries its
per-seed differences ``per_seed`` and the exact sign-flip test over them
(:mod:`speccore.bench.seeds`): ``seed_lo``/``seed_hi``/``seed_p``. :func:`compare_cells` then
corrects the seed-level p-values with Holm's procedure within two families, the comparisons
that can be marked ▲/▼ (each method against random, each variant against its method) and the
leaders' comparisons (each method against its best other), into ``p_holm``;
:attr:`PairedDiff.better` and :attr:`PairedDiff.worse` follow ``p_holm``.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..utils.io import atomic_open
from .labels import (
    FULL,
    RANDOM,
    VARIANT_KIND,
    ZERO_SHOT,
    higher_is_better,
    order_by_mean,
    row_label,
)
from .metrics import MetricSettings, bleu_from_statistics_batch, bleu_statistics
from .seeds import holm_adjust, sign_flip_test

logger = logging.getLogger(__name__)

#: Metrics compared per row; ``bleu4`` is resampled through its sufficient statistics.
PAIRED_METRICS = ("rougeL", "bleu4", "nll")
#: ``kind`` of a comparison: against random, against the best other method row at that rate
#: (for the leader, the runner-up), or a variant against the method it varies (``staff-derived``
#: − ``staff``: does another small model select better?).
VS_RANDOM, VS_BEST, VS_BASE = RANDOM, "best_other", VARIANT_KIND
_MAX_ENTRIES = 2_000_000  # resample-count matrix entries drawn at once
_CACHED_ENTRIES = 4_000_000  # up to 32 MB of counts kept per cached set


_NAN = float("nan")


@dataclass(frozen=True)
class PairedResult:
    """A paired difference A − B: see the module docstring. ``lo``, ``hi`` and ``p`` are the
    row bootstrap with the models fixed; ``per_seed`` the per-seed differences and
    ``seed_lo``, ``seed_hi``, ``seed_p`` their exact sign-flip test (the verdict's)."""

    delta: float
    lo: float
    hi: float
    p: float
    seed_std: float | None
    n_seeds: int
    n_rows: int
    resamples: int
    confidence: float = 0.95
    per_seed: tuple[float, ...] = ()
    seed_lo: float = _NAN
    seed_hi: float = _NAN
    seed_p: float = _NAN


@dataclass(frozen=True)
class PairedDiff(PairedResult):
    """``method`` − ``baseline`` on ``metric`` at ``prune_rate`` (``kind``: :data:`VS_RANDOM`,
    :data:`VS_BEST` or :data:`VS_BASE`); ``p_holm``: ``seed_p`` Holm-adjusted within its
    family (NaN: not adjusted, ``seed_p`` decides)."""

    metric: str = ""
    prune_rate: float = 0.0
    method: str = ""
    baseline: str = ""
    kind: str = VS_RANDOM
    p_holm: float = _NAN

    @property
    def decision_p(self) -> float:
        """The p-value the marks follow: ``p_holm``, or ``seed_p`` when not adjusted."""
        return self.seed_p if math.isnan(self.p_holm) else self.p_holm

    @property
    def significant(self) -> bool:
        """The seed-level test rejects 0 at ``1 - confidence`` after Holm (False without a
        test)."""
        p = self.decision_p
        return bool(not math.isnan(p) and p <= 1 - self.confidence and self.delta != 0)

    @property
    def better(self) -> bool:
        """``method`` is significantly better than ``baseline`` (for NLL: lower)."""
        up = self.delta > 0 if higher_is_better(self.metric) else self.delta < 0
        return self.significant and bool(up)

    @property
    def worse(self) -> bool:
        return self.significant and not self.better

    @property
    def rows_significant(self) -> bool:
        """The "models fixed" row interval excludes 0 (False without an interval)."""
        return bool(self.lo > 0 or self.hi < 0)


# ---------------------------------------------------------------------------------------------
# The paired bootstrap
# ---------------------------------------------------------------------------------------------


def resample_counts(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Bootstrap resamples of ``n`` rows as count matrices (how often each row is drawn),
    float64 chunks of shape (r, n) whose r add up to ``resamples``.

    Depends only on (``n``, ``resamples``, ``seed``): every comparison on ``n`` rows sees the
    same resamples, whichever metric or methods it compares. Small enough sets are kept (the
    last two) since a bench asks for the same ones dozens of times.
    """
    if n * resamples <= _CACHED_ENTRIES:
        yield from _cached_counts(n, resamples, seed)
    else:
        yield from _draw_counts(n, resamples, seed)


def _draw_counts(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng([seed, 0x9A1D])
    chunk = max(1, _MAX_ENTRIES // max(1, n))
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        idx = rng.integers(0, n, size=(size, n))
        flat = idx + n * np.arange(size)[:, None]
        counts = np.bincount(flat.ravel(), minlength=size * n).reshape(size, n)
        yield counts.astype(np.float64)


@functools.lru_cache(maxsize=2)
def _cached_counts(n: int, resamples: int, seed: int) -> tuple[np.ndarray, ...]:
    chunks = tuple(_draw_counts(n, resamples, seed))
    for c in chunks:
        c.flags.writeable = False  # shared between callers
    return chunks


def paired_mean_diff(
    a: np.ndarray, b: np.ndarray, resamples: int, seed: int = 0, confidence: float = 0.95
) -> PairedResult:
    """Paired difference of a per-row mean metric: ``a`` and ``b`` are (seeds, rows) arrays of
    the two methods' per-row values, row ``i`` and seed ``s`` the same in both."""
    a, b = _check_pair(a, b, 2)
    d = a - b
    n = d.shape[1]
    row_diff = d.mean(axis=0)  # a resample takes a row for every seed at once
    draws = np.concatenate(
        [c @ row_diff / n for c in resample_counts(n, resamples, seed)] or [np.empty(0)]
    )
    return _result(d.mean(axis=1), draws, n, confidence)


def paired_bleu_diff(
    a_stats: np.ndarray,
    b_stats: np.ndarray,
    resamples: int,
    seed: int = 0,
    confidence: float = 0.95,
) -> PairedResult:
    """Paired difference of corpus BLEU-4: ``a_stats`` and ``b_stats`` are (seeds, rows, 10)
    per-row sufficient statistics (:func:`~speccore.bench.metrics.bleu_statistics`). Each
    resample recomputes both corpora's BLEU per seed from the drawn rows' summed statistics."""
    a, b = _check_pair(a_stats, b_stats, 3)
    n = a.shape[1]
    per_seed = bleu_from_statistics_batch(a.sum(axis=1)) - bleu_from_statistics_batch(b.sum(axis=1))
    chunks = []
    for counts in resample_counts(n, resamples, seed):
        # (r, n) @ (seeds, n, 10) -> (seeds, r, 10): every seed's totals on the same rows.
        diff = bleu_from_statistics_batch(counts @ a) - bleu_from_statistics_batch(counts @ b)
        chunks.append(diff.mean(axis=0))
    draws = np.concatenate(chunks or [np.empty(0)])
    return _result(per_seed, draws, n, confidence)


def _check_pair(a: Any, b: Any, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != ndim or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(
            f"paired values need the same shape (seeds, rows{', 10' if ndim == 3 else ''}) "
            f"for both methods, got {a.shape} and {b.shape}"
        )
    return a, b


def _result(per_seed: np.ndarray, draws: np.ndarray, n: int, confidence: float) -> PairedResult:
    """Point estimate, seed spread and the seed-level test from the per-seed differences; the
    models-fixed interval and p from the resampled differences (NaN without resamples)."""
    delta = float(per_seed.mean())
    seed_std = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else None
    if len(draws) == 0:
        lo = hi = p = float("nan")
    else:
        tail = (1 - confidence) / 2 * 100
        lo, hi = (float(x) for x in np.percentile(draws, [tail, 100 - tail]))
        share = (1 + np.array([(draws <= 0).sum(), (draws >= 0).sum()])) / (1 + len(draws))
        p = float(min(1.0, 2 * share.min()))
    test = sign_flip_test(per_seed, confidence)
    return PairedResult(
        delta,
        lo,
        hi,
        p,
        seed_std,
        len(per_seed),
        n,
        len(draws),
        confidence,
        tuple(float(x) for x in per_seed),
        test.lo,
        test.hi,
        test.p,
    )


def holm_families(diffs: Sequence[PairedDiff]) -> list[PairedDiff]:
    """``diffs`` with ``p_holm`` set: Holm over the seed-level p-values of each family, the
    comparisons that can be marked (against random, variants against their method) and the
    leaders' (against the best other method), every metric and pruning rate together."""
    out = list(diffs)
    for family in ({VS_RANDOM, VS_BASE}, {VS_BEST}):
        members = [i for i, d in enumerate(out) if d.kind in family]
        adjusted = holm_adjust([out[i].seed_p for i in members])
        for i, p in zip(members, adjusted, strict=True):
            out[i] = dataclasses.replace(out[i], p_holm=p)
    return out


# ---------------------------------------------------------------------------------------------
# From cell records
# ---------------------------------------------------------------------------------------------


def row_values(
    record: Mapping[str, Any],
    references: Sequence[Sequence[str]] | None = None,
    settings: MetricSettings | None = None,
) -> dict[str, np.ndarray]:
    """A cell's per-row values by metric: ``rougeL`` (n,), ``bleu4`` (n, 10) sufficient
    statistics, ``nll`` (m,); a metric the record does not carry is left out.

    Read from the record's ``per_row`` (``rougeL``, ``bleu4_stats``, ``nll``); cells written
    before it have ``rougeL_per_sample`` only. With ``references`` (the evaluation rows'), the
    BLEU statistics of such a cell are recomputed from its ``predictions``.
    """
    per_row = record.get("per_row") or {}
    out: dict[str, np.ndarray] = {}
    rouge = per_row.get("rougeL", record.get("rougeL_per_sample"))
    if rouge is not None and len(rouge):
        out["rougeL"] = np.asarray(rouge, dtype=np.float64)
    if per_row.get("bleu4_stats") is not None and len(per_row["bleu4_stats"]):
        out["bleu4"] = np.asarray(per_row["bleu4_stats"], dtype=np.float64).reshape(-1, 10)
    elif references is not None and record.get("predictions"):
        preds = record["predictions"]
        if len(preds) == len(references):
            out["bleu4"] = bleu_statistics(preds, references, settings).astype(np.float64)
    if per_row.get("nll") is not None and len(per_row["nll"]):
        out["nll"] = np.asarray(per_row["nll"], dtype=np.float64)
    return out


def settings_from_cells(cells: Mapping[str, Mapping[str, Any]]) -> MetricSettings:
    """The bench's metric settings as its cells recorded them (defaults if none did)."""
    known = {f.name for f in dataclasses.fields(MetricSettings)}
    for record in cells.values():
        stored = (record.get("settings") or {}).get("metrics")
        if isinstance(stored, dict):
            return MetricSettings(**{k: v for k, v in stored.items() if k in known})
    return MetricSettings()


@dataclass
class _Group:
    """The cells of one method row at one pruning rate, by seed."""

    records: dict[int, Mapping[str, Any]]
    values: dict[int, dict[str, np.ndarray]]

    def mean(self, metric: str) -> float | None:
        vals = [
            float(r["metrics"][metric])
            for r in self.records.values()
            if (r.get("metrics") or {}).get(metric) is not None
        ]
        return float(np.mean(vals)) if vals else None


def compare_cells(
    cells: Mapping[str, Mapping[str, Any]],
    settings: MetricSettings | None = None,
    references: Sequence[Sequence[str]] | None = None,
    metrics: Iterable[str] = PAIRED_METRICS,
    bases: Mapping[str, str] | None = None,
) -> list[PairedDiff]:
    """Every paired comparison the cells allow: per pruning rate and metric, each method row
    against ``random`` and against the best other method row (by mean over seeds; for the
    leader, the runner-up), and each variant in ``bases`` (variant name → the method it varies,
    a bench config's ``variants``) against its method. Zero-shot and full-data cells are not
    compared.

    ``settings`` default to those the cells recorded. A pair is left out when the two rows
    share no seed with per-row values of the metric on the same number of rows (cells written
    before per-row values existed).
    """
    settings = settings or settings_from_cells(cells)
    groups = _groups(cells, references, settings)
    out: list[PairedDiff] = []
    for rate in sorted({rate for _, rate in groups}):
        at_rate = {label: g for (label, r), g in groups.items() if r == rate}
        for metric in metrics:
            out += _compare_at(at_rate, metric, rate, settings, bases or {})
    return holm_families(out)


def _groups(
    cells: Mapping[str, Mapping[str, Any]],
    references: Sequence[Sequence[str]] | None,
    settings: MetricSettings,
) -> dict[tuple[str, float], _Group]:
    groups: dict[tuple[str, float], _Group] = {}
    for record in cells.values():
        if record["method"] in (FULL, ZERO_SHOT):
            continue
        key = (row_label(dict(record)), round(float(record["prune_rate"]), 9))
        group = groups.setdefault(key, _Group({}, {}))
        seed = int(record.get("seed") or 0)
        group.records[seed] = record
        group.values[seed] = row_values(record, references, settings)
    return groups


def _compare_at(
    groups: dict[str, _Group],
    metric: str,
    rate: float,
    settings: MetricSettings,
    bases: Mapping[str, str],
) -> list[PairedDiff]:
    pairs = [(m, RANDOM, VS_RANDOM) for m in groups if m != RANDOM and RANDOM in groups]
    # Against random already: a variant of random is compared once.
    pairs += [
        (m, bases[m], VS_BASE) for m in groups if bases.get(m) in groups and bases[m] != RANDOM
    ]
    order = order_by_mean({m: g.mean(metric) for m, g in groups.items()}, higher_is_better(metric))
    for m in groups:
        others = [o for o in order if o != m]
        if others:
            pairs.append((m, others[0], VS_BEST))
    out = []
    for method, baseline, kind in pairs:
        result = _paired_diff(groups[method], groups[baseline], metric, settings)
        if result is not None:
            out.append(
                PairedDiff(
                    **dataclasses.asdict(result),
                    metric=metric,
                    prune_rate=rate,
                    method=method,
                    baseline=baseline,
                    kind=kind,
                )
            )
    return out


def _paired_diff(
    a: _Group, b: _Group, metric: str, settings: MetricSettings
) -> PairedResult | None:
    """A − B over the seeds where both have per-row values of ``metric`` on as many rows."""
    seeds = [
        s
        for s in sorted(set(a.values) & set(b.values))
        if metric in a.values[s]
        and metric in b.values[s]
        and a.values[s][metric].shape == b.values[s][metric].shape
    ]
    if not seeds:
        return None
    shapes = {a.values[s][metric].shape for s in seeds}
    if len(shapes) > 1:
        logger.warning("%s: seeds scored different numbers of rows %s; not paired", metric, shapes)
        return None
    va = np.stack([a.values[s][metric] for s in seeds])
    vb = np.stack([b.values[s][metric] for s in seeds])
    args = (settings.bootstrap, settings.bootstrap_seed, settings.confidence)
    if metric == "bleu4":
        return paired_bleu_diff(va, vb, *args)
    return paired_mean_diff(va, vb, *args)


# ---------------------------------------------------------------------------------------------
# paired.csv
# ---------------------------------------------------------------------------------------------

CSV_COLUMNS = [
    "metric",
    "prune_rate",
    "method",
    "baseline",
    "kind",
    "delta",
    "lo",
    "hi",
    "p",
    "seed_std",
    "n_seeds",
    "n_rows",
    "resamples",
    "confidence",
    "per_seed",
    "seed_lo",
    "seed_hi",
    "seed_p",
    "p_holm",
]
_INT_COLUMNS = {"n_seeds", "n_rows", "resamples"}
_TEXT_COLUMNS = {"metric", "method", "baseline", "kind"}


def write_paired_csv(path: Path, diffs: Sequence[PairedDiff]) -> None:
    """One line per comparison, atomically (tables can be rebuilt from it without cells)."""
    with atomic_open(path) as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for d in diffs:
            writer.writerow([_csv_text(getattr(d, c)) for c in CSV_COLUMNS])


def read_paired_csv(path: str | Path) -> list[PairedDiff]:
    with open(path, encoding="utf-8", newline="") as f:
        return [_parse(row) for row in csv.DictReader(f)]


def _csv_text(value: Any) -> str:
    if isinstance(value, tuple):  # per_seed: the differences, space-separated
        return " ".join(repr(float(v)) for v in value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def _parse(row: dict[str, str]) -> PairedDiff:
    """One comparison; a paired.csv written before the seed-level columns reads with them
    empty (NaN)."""
    values: dict[str, Any] = {}
    for key, text in row.items():
        if key in _TEXT_COLUMNS:
            values[key] = text
        elif key in _INT_COLUMNS:
            values[key] = int(text)
        elif key == "per_seed":
            values[key] = tuple(float(v) for v in text.split())
        elif text == "":
            values[key] = None if key == "seed_std" else float("nan")
        else:
            values[key] = float(text)
    return PairedDiff(**values)


# ---------------------------------------------------------------------------------------------
# Seed-level tests from results.csv alone
# ---------------------------------------------------------------------------------------------


def seed_tests_from_rows(
    diffs: Sequence[PairedDiff], rows: Sequence[Mapping[str, Any]]
) -> list[PairedDiff]:
    """``diffs`` (e.g. an old ``paired.csv``) with their per-seed differences and seed-level
    tests recomputed from ``results.csv`` rows, then Holm-adjusted.

    A mean metric's per-seed difference is the difference of the two cells' means on the same
    rows, and BLEU's the difference of their corpus BLEU: the test needs the cells' metrics
    only, not their per-row values. The models-fixed columns are kept as they are.
    """
    by_cell = {
        (row_label(dict(r)), round(float(r["prune_rate"]), 9), int(r["seed"] or 0)): r
        for r in rows
        if r["method"] not in (FULL, ZERO_SHOT)
    }
    out = []
    for d in diffs:
        rate = round(d.prune_rate, 9)
        per_seed = []
        for (label, r, seed), row in sorted(by_cell.items(), key=lambda kv: kv[0][2]):
            other = by_cell.get((d.baseline, rate, seed))
            if label != d.method or r != rate or other is None:
                continue
            if row.get(d.metric) is not None and other.get(d.metric) is not None:
                per_seed.append(float(row[d.metric]) - float(other[d.metric]))
        test = sign_flip_test(per_seed, d.confidence)
        out.append(
            dataclasses.replace(
                d,
                per_seed=tuple(per_seed),
                seed_lo=test.lo,
                seed_hi=test.hi,
                seed_p=test.p,
                n_seeds=len(per_seed) or d.n_seeds,
            )
        )
    return holm_families(out)
