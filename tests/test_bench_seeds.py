"""Seed-level inference: the exact sign-flip test and its inverted interval against hand-worked
examples and a brute-force enumeration, its p-value floor, Holm on a hand-worked set,
comparisons where the rows-only ("models fixed") and the seed-level verdicts disagree, and the
seed-level tests rebuilt from results.csv rows."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from speccore.bench import seeds
from speccore.bench.paired import (
    VS_RANDOM,
    compare_cells,
    paired_mean_diff,
    seed_tests_from_rows,
)
from speccore.bench.report import collect_rows
from speccore.bench.seeds import (
    holm_adjust,
    min_p_value,
    seeds_needed,
    sign_flip_test,
)

# The issue's staff − random reference NLL per seed (UI mini bench, seeds 0-2).
ISSUE_SEEDS = [-0.028, 0.007, 0.083]


def brute_force_p(d: list[float] | np.ndarray) -> float:
    """Two-sided sign-flip p-value by listing every sign pattern: the share of patterns whose
    |sum| is at least the observed |sum| (the same as twice the smaller one-sided share, the
    sign-flipped sums being symmetric)."""
    d = [float(x) for x in d]
    observed = abs(sum(d))
    sums = [
        abs(sum(s * x for s, x in zip(signs, d, strict=True)))
        for signs in itertools.product([1, -1], repeat=len(d))
    ]
    return sum(s >= observed - 1e-12 for s in sums) / len(sums)


def test_the_issues_three_seeds_by_hand() -> None:
    # Sums over the 8 sign patterns: with +0.083: 0.062 (observed), 0.118, 0.048, 0.104; with
    # -0.083 all four are negative. 3 of 8 reach 0.062: p = 2 · 3/8 = 0.75.
    t = sign_flip_test(ISSUE_SEEDS)
    assert t.delta == pytest.approx(0.062 / 3)
    assert t.p == pytest.approx(0.75)
    assert t.p == pytest.approx(brute_force_p(ISSUE_SEEDS))
    # floor(0.05 · 8 / 2) = 0 patterns may be rejected per side: no finite 95% interval.
    assert (t.lo, t.hi) == (-math.inf, math.inf)
    assert t.exact and t.n_seeds == 3


@pytest.mark.parametrize(
    ("n", "floor"), [(1, 1.0), (3, 0.25), (4, 0.125), (5, 0.0625), (6, 0.03125)]
)
def test_p_value_floor(n: int, floor: float) -> None:
    """All differences of one sign: only the observed pattern and its mirror are as extreme."""
    positive = np.linspace(0.1, 0.5, n)
    assert sign_flip_test(positive).p == pytest.approx(floor)
    assert sign_flip_test(-positive).p == pytest.approx(floor)
    assert min_p_value(n) == pytest.approx(floor)


def test_seeds_needed_for_a_level() -> None:
    # 2/2^S <= level: S >= 1 + log2(1/level).
    assert seeds_needed(0.05) == 6  # 2/2^5 = 0.0625 > 0.05 >= 2/2^6
    assert seeds_needed(0.25) == 3  # 2/2^3 = 0.25
    assert seeds_needed(0.05 / 2) == 7  # Holm's first step over 2 comparisons: 0.025
    assert seeds_needed(0.05 / 15) == 10  # 1 + log2(300) = 9.2
    for level in (0.3, 0.05, 0.01, 0.001):
        n = seeds_needed(level)
        assert min_p_value(n) <= level < min_p_value(n - 1)


def test_six_seeds_of_one_sign_give_the_range_as_interval() -> None:
    d = [0.01, 0.03, 0.02, 0.05, 0.04, 0.02]
    t = sign_flip_test(d)
    # 64 patterns, floor(0.05 · 64 / 2) = 1, minus the identity: the extreme subset means,
    # which are the single smallest and largest differences.
    assert (t.lo, t.hi) == pytest.approx((0.01, 0.05))
    assert t.p == pytest.approx(2 / 64)


def test_interval_is_the_set_of_shifts_the_test_keeps() -> None:
    """Against brute force: a shift inside the interval is not rejected on d − shift, one
    outside is (7 seeds, 128 patterns, 3 rejectable per side)."""
    d = np.array([0.4, -0.3, 1.2, 0.9, 0.1, 0.7, -0.2])
    t = sign_flip_test(d)
    assert np.isfinite([t.lo, t.hi]).all()
    assert t.p == pytest.approx(brute_force_p(d))
    step = 1e-6
    for shift in np.linspace(t.lo - 0.5, t.hi + 0.5, 41):
        inside = t.lo <= shift <= t.hi
        assert (brute_force_p(d - shift) > 0.05) == inside, shift
    # The ends themselves are kept, just past them is rejected.
    assert brute_force_p(d - t.lo) > 0.05 and brute_force_p(d - (t.lo - step)) <= 0.05
    assert brute_force_p(d - t.hi) > 0.05 and brute_force_p(d - (t.hi + step)) <= 0.05


def test_many_seeds_use_random_patterns_close_to_the_exact_test(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    d = np.random.default_rng(3).normal(0.15, 1.0, 17)
    approx = sign_flip_test(d, resamples=20_000, seed=1)
    assert not approx.exact
    monkeypatch.setattr(seeds, "EXACT_MAX_SEEDS", 17)
    exact = sign_flip_test(d)
    assert exact.exact
    # Monte Carlo standard error of a p-value from 20,000 patterns is <= 0.0036.
    assert approx.p == pytest.approx(exact.p, abs=0.02)
    assert approx.lo == pytest.approx(exact.lo, abs=0.1) and approx.hi == pytest.approx(
        exact.hi, abs=0.1
    )
    assert sign_flip_test(d, seed=1) == sign_flip_test(d, seed=1)  # seeded


def test_zero_differences_are_not_significant() -> None:
    t = sign_flip_test([0.0] * 8)
    assert t.p == 1.0 and t.delta == 0.0
    assert sign_flip_test([]).n_seeds == 0 and math.isnan(sign_flip_test([]).p)
    with pytest.raises(ValueError, match="finite"):
        sign_flip_test([0.1, float("nan")])


def test_holm_on_a_hand_worked_set() -> None:
    # Sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → max(0.06, 0.04).
    adjusted = holm_adjust([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # At 0.05 Holm keeps two (Bonferroni's 0.0125 also two; unadjusted would keep all four).
    assert [p <= 0.05 for p in adjusted] == [True, False, False, True]
    # NaN is not a comparison: it stays NaN and m is 2.
    both = holm_adjust([0.02, float("nan"), 0.04])
    assert both[0] == pytest.approx(0.04) and math.isnan(both[1]) and both[2] == pytest.approx(0.04)
    assert holm_adjust([0.6, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1


def rows_fixed_pair(per_seed: list[float], row_noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) of shape (seeds, rows) whose per-seed mean differences are ``per_seed`` and whose
    per-row differences add ``row_noise`` (mean 0) to them."""
    noise = row_noise - row_noise.mean()
    b = np.full((len(per_seed), len(noise)), 3.0)
    return b + np.asarray(per_seed)[:, None] + noise[None, :], b


def test_rows_only_marks_what_three_seeds_cannot_carry() -> None:
    """The issue's example: per seed −0.028, +0.007, +0.083 on 200 rows with little row noise.
    The row bootstrap (models fixed) excludes 0; the seed-level test gives p 0.75."""
    noise = np.random.default_rng(0).normal(0, 0.01, 200)
    a, b = rows_fixed_pair(ISSUE_SEEDS, noise)
    r = paired_mean_diff(a, b, resamples=2000, seed=0)
    assert r.delta == pytest.approx(0.062 / 3)
    assert r.lo > 0  # models fixed: "significantly worse"
    assert r.per_seed == pytest.approx(tuple(ISSUE_SEEDS))
    assert r.seed_p == pytest.approx(0.75) and math.isinf(r.seed_lo)


def test_seeds_mark_what_noisy_rows_hide() -> None:
    """The other way round: 8 seeds each +0.5 better, but rows so noisy that the row interval
    holds 0; every seed agrees, so the sign-flip test gives its floor 2/2^8."""
    noise = np.random.default_rng(1).normal(0, 20.0, 30)
    per_seed = [0.5, 0.6, 0.4, 0.5, 0.55, 0.45, 0.5, 0.5]
    a, b = rows_fixed_pair(per_seed, noise)
    r = paired_mean_diff(a, b, resamples=2000, seed=0)
    assert r.lo < 0 < r.hi
    assert r.seed_p == pytest.approx(2 / 2**8)
    assert 0 < r.seed_lo <= r.seed_hi


def test_seed_tests_from_results_rows_match_those_from_cells() -> None:
    from test_bench_paired import bench_cells

    cells = bench_cells()
    from_cells = compare_cells(cells)
    stripped = [
        type(d)(**{**d.__dict__, "per_seed": (), "seed_p": math.nan, "p_holm": math.nan})
        for d in from_cells
    ]
    for record in cells.values():  # what cell_row reads besides the metrics
        record.update(coreset_size=1, n_train=10)
    rebuilt = seed_tests_from_rows(stripped, collect_rows(cells))
    for old, new in zip(from_cells, rebuilt, strict=True):
        assert new.per_seed == pytest.approx(old.per_seed, abs=1e-9), (old.metric, old.method)
        assert new.seed_p == pytest.approx(old.seed_p)
        assert new.p_holm == pytest.approx(old.p_holm)
    assert any(d.kind == VS_RANDOM and len(d.per_seed) == 2 for d in rebuilt)
