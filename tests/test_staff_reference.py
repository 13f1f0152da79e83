"""STAFF's ``allocation="reference"`` (the authors' script) and the edge cases their script gets
wrong: the last region's budget, the maximum sample, min-max normalised scores."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from speccore.config import coreset_size
from speccore.selection.regions import equal_width_regions
from speccore.selection.staff import (
    allocate_reference,
    split_regions,
    staff_reference_select,
    staff_select,
    verify_regions,
)

N, K, B_V = 1000, 50, 10


def lognormal_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Small-model scores and a target that disagrees with them by a random factor."""
    rng = np.random.default_rng(seed)
    small = rng.lognormal(0.0, 1.0, N)
    return small, small * rng.lognormal(0.0, 0.5, N)


def allocated_before_last(table: list[dict]) -> int:
    """What the loop itself (not the top-up) took before the last region it visited."""
    return sum(row["taken"] - row["filled"] for row in table[:-1])


@pytest.mark.parametrize("p", [0.2, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("seed", range(8))
def test_last_region_budget_is_exactly_what_is_left(p: float, seed: int) -> None:
    small, target = lognormal_case(seed)
    m = coreset_size(N, p)
    sel = staff_reference_select(
        small,
        m,
        regions=K,
        verify_per_region=B_V,
        verify=lambda idx: target[idx],
        seed=seed,
        prune_rate=p,
    )
    table = sel.region_table
    assert table[-1]["size"] > B_V  # the largest region is visited last and verified
    assert table[-1]["budget"] == m - allocated_before_last(table)
    assert len(sel) == m


def test_share_of_the_last_region_is_one_with_awkward_v() -> None:
    # V values whose running sum drifts: by subtraction 0.1·3 ... leaves 0.09999999999999998.
    scores = np.arange(1.0, 41.0)
    blocks = split_regions(scores, 4)
    for b, v in zip(blocks, [0.1, 0.7, 0.1, 0.1], strict=True):
        b.v = v
    m = 33
    allocate_reference(blocks, scores, m, verified=None)
    taken_before = sum(len(b.taken) for b in blocks[:-1])
    assert blocks[-1].budget == m - taken_before


def test_small_regions_are_not_verified_and_get_an_even_share() -> None:
    # Two regions of 3 samples (≤ b_v = 4: no target call, even share) and one of 40.
    scores = np.concatenate([[1.0, 1.1, 1.2], [5.0, 5.1, 5.2], np.linspace(9.0, 10.0, 40)])
    seen: list[int] = []

    def target(idx: np.ndarray) -> np.ndarray:
        seen.extend(idx.tolist())
        return scores[idx] * 3.0

    sel = staff_reference_select(
        scores, 20, regions=3, verify_per_region=4, verify=target, seed=0, prune_rate=0.0
    )
    rows = {row["size"]: row for row in sel.region_table}
    assert rows[3]["verified"] == 0
    assert len(seen) == 4 and all(i >= 6 for i in seen)  # only the large region was verified
    # visiting order: region 0 (3), region 1 (3), region 2 (40): budgets ⌊20/3⌋, ⌊17/2⌋, rest
    assert [row["budget"] for row in sel.region_table] == [6, 8, 14]
    assert [row["taken"] for row in sel.region_table] == [3, 3, 14]
    assert sel.info["n_filled"] == 0 and len(sel) == 20


def test_top_up_draws_from_the_whole_pool_after_the_cut() -> None:
    # The largest regions (low scores, visited last) have V = 0: their share is 0, the loop ends
    # short, and the script fills from every sample left after the cut.
    small, target = lognormal_case(3)
    target[small < np.quantile(small, 0.5)] = 0.0
    m = coreset_size(N, 0.5)
    runs = [
        staff_reference_select(
            small, m, regions=K, verify_per_region=B_V, verify=lambda i: target[i], seed=s
        )
        for s in (1, 1, 2)
    ]
    sel = runs[0]
    assert sel.info["n_filled"] > 0 and len(sel) == m
    assert sel.regions is not None and (sel.regions[sel.indices] >= 0).all()  # none from the cut
    filled_from = {row["region"] for row in sel.region_table if row["filled"]}
    assert len(filled_from) > 1  # at random over the pool, not region by region
    assert sum(row["filled"] for row in sel.region_table) == sel.info["n_filled"]
    assert runs[0].indices.tolist() == runs[1].indices.tolist()  # seeded
    assert runs[0].indices.tolist() != runs[2].indices.tolist()


def test_maximum_sample_is_always_in_a_region() -> None:
    # The authors' last edge, s_min + K·w, can round below s_max and lose the maximum sample.
    rounding_loses_it = 0
    for seed in range(300):
        rng = np.random.default_rng(seed)
        scores = rng.lognormal(rng.uniform(-3, 3), rng.uniform(0.2, 2.0), 200)
        lo, hi = scores.min(), scores.max()
        rounding_loses_it += lo + (hi - lo) / K * K < hi
        ids = equal_width_regions(scores, K)
        assert ids[np.argmax(scores)] == K - 1
        assert ((ids >= 0) & (ids < K)).all()
        paper = staff_select(scores, 50, regions=K, verify_per_region=3, verify=None, seed=seed)
        assert paper.regions is not None and (paper.regions >= 0).all()
        ref = staff_reference_select(scores, 50, regions=K, verify_per_region=3, verify=None)
        pool = ref.regions is not None and ref.regions >= 0
        assert pool.sum() == 200 - ref.info["n_reference_cut"]
        in_pool = np.flatnonzero(pool)
        assert ref.regions[in_pool[np.argmax(scores[in_pool])]] >= 0
    assert rounding_loses_it > 0  # the case the script gets wrong did occur


@pytest.mark.parametrize("select", [staff_select, staff_reference_select])
def test_min_max_normalised_scores_never_divide_by_zero(select) -> None:  # type: ignore[no-untyped-def]
    # Min-max normalised: 30 samples sit at exactly 0 with a gap above them, so one region holds
    # only them and its verified small scores sum to 0.
    rng = np.random.default_rng(0)
    raw = np.concatenate([np.zeros(30), rng.uniform(5.0, 10.0, 470)])
    scores = (raw - raw.min()) / (raw.max() - raw.min())
    target = rng.uniform(0.0, 1.0, 500)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 0/0 in numpy would warn
        sel = select(scores, 100, regions=20, verify_per_region=5, verify=lambda i: target[i])
    zero_region = next(row for row in sel.region_table if row["score_hi"] == 0.0)
    assert zero_region["verified"] == 5 and math.isnan(zero_region["ratio"])
    assert zero_region["V"] == 1.0  # counted as average
    for row in sel.region_table:
        assert math.isfinite(row["V"]) and isinstance(row["budget"], int) and row["budget"] >= 0
    assert len(sel) == 100


def test_verify_regions_zero_sum_region_direct() -> None:
    scores = np.array([0.0, 0.0, 0.0, 2.0, 2.5, 3.0])  # width 1.5: region 0 holds the zeros
    blocks = split_regions(scores, 2)
    rng = np.random.default_rng(0)
    verify_regions(blocks, scores, lambda i: np.ones(len(i)), 3, rng)
    zero = next(b for b in blocks if b.hi == 0.0)
    other = next(b for b in blocks if b.hi > 0.0)
    assert math.isnan(zero.ratio) and zero.v == 1.0
    assert other.ratio == pytest.approx(3.0 / 7.5) and other.v == 1.0  # the only finite ratio
