"""Seed-level inference: is a method's difference to random larger than what another training
seed would give?

A bench cell is one training seed. Two methods evaluated with the same seeds on the same rows
give one difference per seed, ``d_s`` (method − baseline, the metric of seed ``s``'s two
cells). The verdict asks whether those differences are centred away from 0, so its unit of
replication is the seed, not the evaluation row: a row bootstrap with the trained models held
fixed (:mod:`speccore.bench.paired`'s "models fixed" interval) answers a narrower question
("for these trained models") and shrinks with more rows however few seeds there are.

**The test: an exact sign-flip (randomisation) test on the per-seed differences.** Under the
null hypothesis the two methods are exchangeable within a seed, so each ``d_s`` is as likely
to be ``-d_s``: the ``2^S`` sign patterns of ``S`` seeds are equally likely. The statistic is
the sum ``T = Σ d_s``; the one-sided p-values count the sign patterns ``ε`` (the identity
included) whose ``T(ε) = Σ ε_s d_s`` is at least / at most the observed one, and the two-sided
p-value is twice the smaller, capped at 1. It is exact for any ``S`` (no normality, no
large-sample argument), which a seed bootstrap is not: with 3 seeds a bootstrap has 10
distinct resamples and puts all three same-signed differences' interval away from 0, while
the sign-flip test says what 3 seeds can say, ``p >= 2 / 2^3 = 0.25``. The smallest p-value
``S`` seeds can give is ``2 / 2^S`` (:func:`min_p_value`); :func:`seeds_needed` is the fewest
seeds that can reach a level (6 for 0.05; more under a multiple-comparison correction).

**The interval inverts the same test**: the shifts ``δ`` the test does not reject on
``d - δ``. By Hartigan's subset-mean result its ends are order statistics of the means of the
``2^S - 1`` non-empty subsets of the differences: the ``k``-th smallest and ``k``-th largest,
``k = floor(α 2^S / 2)`` (``α = 1 - confidence``), and ``(-∞, +∞)`` when ``k = 0`` (fewer
seeds than the level needs). So the interval excludes 0 exactly when ``p <= α``: interval and
p-value never tell different stories.

**What varies, what is held fixed.** The test covers every source of variance that differs
between seeds: the target's LoRA initialisation and data order, the selection's random draws,
and, with the bench setting ``selection_seeds: per_seed``, the selection's own fine-tunes
(small model, the tuned target of GraNd/EL2N/CCS, STAFF's verification); with ``shared``
those are one fine-tune for all seeds and the verdict is conditional on it. The evaluation rows
are the same for every seed and method, so they are held fixed: the verdict is about this
evaluation set (the "models fixed" row bootstrap shows how much the rows alone move the
difference). Per-seed differences are all the test needs, so it can be rebuilt from a
``results.csv`` (each cell's metric) without the cells' per-row values.

More than :data:`EXACT_MAX_SEEDS` seeds use ``resamples`` random sign patterns (seeded) plus
the identity instead of all ``2^S``: the Monte Carlo p-value ``(1 + count) / (1 + resamples)``,
and the interval from the same patterns' subset means.

Several comparisons in one table are corrected with Holm's step-down procedure
(:func:`holm_adjust`), which controls the family-wise error rate at the level without any
assumption on how the comparisons depend on each other (they share random's cells).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Up to this many seeds every sign pattern is enumerated (2^16 = 65,536 patterns).
EXACT_MAX_SEEDS = 16
#: Random sign patterns beyond EXACT_MAX_SEEDS seeds.
MONTE_CARLO_PATTERNS = 20_000


@dataclass(frozen=True)
class SeedTest:
    """The sign-flip test of per-seed differences: mean ``delta``, the inverted interval
    ``[lo, hi]`` (infinite ends where the seeds cannot reach the level), two-sided ``p``, and
    whether every sign pattern was enumerated (``exact``)."""

    delta: float
    lo: float
    hi: float
    p: float
    n_seeds: int
    exact: bool = True
    confidence: float = 0.95


def min_p_value(n_seeds: int) -> float:
    """The smallest two-sided p-value an exact sign-flip test of ``n_seeds`` differences can
    give: the observed pattern and its mirror, ``2 / 2^n`` (1 for one seed)."""
    return min(1.0, 2.0 / 2.0**n_seeds) if n_seeds >= 1 else 1.0


def seeds_needed(level: float) -> int:
    """The fewest seeds whose exact sign-flip test can give ``p <= level``."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return max(1, math.ceil(1 + math.log2(1 / level) - 1e-12))


def sign_patterns(n_seeds: int, resamples: int = MONTE_CARLO_PATTERNS, seed: int = 0) -> np.ndarray:
    """Sign patterns (rows of ±1), the identity (all +1) first: every one of the ``2^n``
    patterns up to :data:`EXACT_MAX_SEEDS` seeds, else the identity and ``resamples`` drawn
    with ``seed``."""
    if n_seeds <= EXACT_MAX_SEEDS:
        bits = (np.arange(2**n_seeds)[:, None] >> np.arange(n_seeds)[None, :]) & 1
        return 1.0 - 2.0 * bits  # pattern 0 has no bit set: the identity
    rng = np.random.default_rng([seed, 0x5EED])
    drawn = rng.choice([-1.0, 1.0], size=(resamples, n_seeds))
    return np.vstack([np.ones((1, n_seeds)), drawn])


def sign_flip_test(
    per_seed: Sequence[float] | np.ndarray,
    confidence: float = 0.95,
    resamples: int = MONTE_CARLO_PATTERNS,
    seed: int = 0,
) -> SeedTest:
    """Two-sided sign-flip test of per-seed differences and its inverted interval (see the
    module docstring). NaN everything without a difference."""
    d = np.asarray(per_seed, dtype=np.float64)
    if d.ndim != 1 or not np.isfinite(d).all():
        raise ValueError("per-seed differences must be a list of finite numbers")
    if len(d) == 0:
        nan = float("nan")
        return SeedTest(nan, nan, nan, nan, 0, True, confidence)
    patterns = sign_patterns(len(d), resamples, seed)
    exact = len(d) <= EXACT_MAX_SEEDS
    p = _p_value(d, patterns)
    lo, hi = _interval(d, patterns, 1 - confidence)
    return SeedTest(float(d.mean()), lo, hi, p, len(d), exact, confidence)


def _p_value(d: np.ndarray, patterns: np.ndarray) -> float:
    sums = patterns @ d
    observed = float(d.sum())
    # Sums that equal the observed one up to rounding (a zero difference flipped) count as
    # at least as extreme: the test stays conservative.
    tol = 8 * np.finfo(np.float64).eps * len(d) * float(np.abs(d).sum())
    upper = np.count_nonzero(sums >= observed - tol) / len(patterns)
    lower = np.count_nonzero(sums <= observed + tol) / len(patterns)
    return float(min(1.0, 2 * min(upper, lower)))


def _interval(d: np.ndarray, patterns: np.ndarray, alpha: float) -> tuple[float, float]:
    """The shifts the test does not reject: for shift δ the one-sided count is the patterns
    that flip nothing plus the flipped sets whose mean is >= δ (<= δ for the other side), so
    the ends are order statistics of the flipped sets' means."""
    flipped = patterns < 0
    sizes = flipped.sum(axis=1)
    means = (flipped @ d)[sizes > 0] / sizes[sizes > 0]
    none_flipped = int(np.count_nonzero(sizes == 0))
    k = math.floor(alpha * len(patterns) / 2 + 1e-9) - none_flipped  # rejectable per side
    if k < 0 or len(means) == 0:
        return float("-inf"), float("inf")
    ordered = np.sort(means)
    return float(ordered[k]), float(ordered[len(ordered) - 1 - k])


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values: reject the ``i``-th smallest of ``m`` at level ``α``
    when it and every smaller one satisfy ``p_(j) <= α / (m - j + 1)``; the adjusted value
    ``max_{j <= i} min(1, (m - j + 1) p_(j))`` is ``<= α`` exactly then. NaN stays NaN and does
    not count in ``m``."""
    values = [float(p) for p in p_values]
    valid = [i for i, p in enumerate(values) if not math.isnan(p)]
    order = sorted(valid, key=lambda i: values[i])
    m = len(order)
    adjusted = [float("nan")] * len(values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * values[i]))
        adjusted[i] = running
    return adjusted
