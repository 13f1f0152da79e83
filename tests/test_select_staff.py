"""STAFF's Algorithm 1 against hand-worked examples."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from speccore.config import coreset_size
from speccore.selection.base import StageTimer
from speccore.selection.regions import equal_width_regions, region_members
from speccore.selection.score_based import check_budget
from speccore.selection.staff import staff_reference_select, staff_select
from speccore.utils.errors import ConfigError

SCORES = np.arange(1.0, 11.0)  # samples 0..9 score 1..10


class CountingVerifier:
    """A target whose effort is ``factor[i] * small score``; counts what it is asked."""

    def __init__(self, small: np.ndarray, factor: np.ndarray) -> None:
        self.small, self.factor = small, factor
        self.calls = 0
        self.seen: list[int] = []

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.seen.extend(indices.tolist())
        return self.small[indices] * self.factor[indices]


def per_region_factor(r0: float, r1: float, r2: float) -> np.ndarray:
    # With K = 3 over 1..10 (width 3): region 0 = samples 0-2, 1 = 3-5, 2 = 6-9.
    return np.array([r0] * 3 + [r1] * 3 + [r2] * 4)


def test_equal_width_regions_by_hand() -> None:
    # width (10 - 1) / 3 = 3: [1,4) [4,7) [7,10], the maximum belongs to the last region.
    assert equal_width_regions(SCORES, 3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert equal_width_regions(np.full(4, 2.5), 5).tolist() == [0, 0, 0, 0]
    members = region_members(np.array([2, 0, 2, 2]))
    assert {k: v.tolist() for k, v in members.items()} == {0: [1], 2: [0, 2, 3]}


def test_coreset_size_is_exact() -> None:
    assert coreset_size(1000, 0.9) == 100  # float arithmetic gives 99
    assert coreset_size(10, 0.4) == 6
    assert coreset_size(7, 0.0) == 7
    with pytest.raises(ConfigError, match="prune rate"):
        coreset_size(10, 1.0)
    with pytest.raises(ConfigError, match="empty"):
        coreset_size(5, 0.9)


def test_paper_allocation_by_hand() -> None:
    # Ratios target/small per region: 3, 1, 2 → mean 2 → V = 1.5, 0.5, 1.0. m = 6.
    # Region sizes 3, 3, 4 are visited 0, 1, 2.
    # R0: ⌊6·1.5/3⌋ = 3 → all of {0,1,2}.  R1: ⌊3·0.5/2⌋ = 0.  R2: ⌊3·1.0/1⌋ = 3 of {6..9}.
    verifier = CountingVerifier(SCORES, per_region_factor(3, 1, 2))
    sel = staff_select(SCORES, 6, regions=3, verify_per_region=10, verify=verifier, seed=0)
    table = {row["region"]: row for row in sel.region_table}
    assert [table[r]["V"] for r in range(3)] == pytest.approx([1.5, 0.5, 1.0])
    assert [table[r]["budget"] for r in range(3)] == [3, 0, 3]
    kept = set(sel.indices.tolist())
    assert {0, 1, 2} <= kept and not kept & {3, 4, 5}
    assert len(kept & {6, 7, 8, 9}) == 3
    assert sel.info["n_filled"] == 0
    assert sel.regions is not None and sel.regions.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]


def test_fill_tops_up_from_largest_v_first() -> None:
    # Ratios 2, 3, 1 → V = 1, 1.5, 0.5; m = 6.
    # R0: ⌊6·1/3⌋ = 2.  R1: ⌊4·1.5/2⌋ = 3 (all).  R2: ⌊1·0.5/1⌋ = 0.  Loop ends at 5.
    # Fill: R1 (V 1.5) has nothing left, so R0 (V 1) gives its last sample → {0..5}.
    verifier = CountingVerifier(SCORES, per_region_factor(2, 3, 1))
    sel = staff_select(SCORES, 6, regions=3, verify_per_region=10, verify=verifier, seed=3)
    assert sel.indices.tolist() == [0, 1, 2, 3, 4, 5]
    assert sel.info["n_filled"] == 1
    no_fill = staff_select(
        SCORES, 6, regions=3, verify_per_region=10, verify=verifier, seed=3, fill=False
    )
    assert len(no_fill) == 5 and set(no_fill.indices.tolist()) >= {3, 4, 5}


def test_reference_allocation_by_hand() -> None:
    # Cut: min(⌊0.1·10⌋, ⌊0.4·10⌋) = 1 → drop sample 9 (score 10). Pool 1..9, K = 3, width 8/3:
    # regions {0,1,2}, {3,4,5}, {6,7,8}. Ratios 2, 3, 1 → V = 1, 1.5, 0.5; ΣV = 3.
    # R0: ⌊6·1/3⌋ = 2 highest → {1, 2}.  R1: ⌊4·1.5/2⌋ = 3 → {3,4,5}.  R2: ⌊1·0.5/0.5⌋ = 1 → {8}.
    # b_v = 2 < 3 samples per region, so every region is verified (the script skips verifying
    # regions of at most b_v samples: tests/test_staff_reference.py).
    factor = np.array([2, 2, 2, 3, 3, 3, 1, 1, 1, 1.0])
    verifier = CountingVerifier(SCORES, factor)
    sel = staff_reference_select(
        SCORES,
        6,
        regions=3,
        verify_per_region=2,
        verify=verifier,
        seed=0,
        prune_rate=0.4,
    )
    assert sel.indices.tolist() == [1, 2, 3, 4, 5, 8]
    assert sel.info["n_reference_cut"] == 1
    assert sel.regions is not None and sel.regions[9] == -1


def test_no_verification_ablation_never_calls_target() -> None:
    # Every V_i = 1: R0 ⌊6/3⌋ = 2, R1 ⌊4/2⌋ = 2, R2 ⌊2/1⌋ = 2.
    sel = staff_select(SCORES, 6, regions=3, verify_per_region=10, verify=None, seed=0)
    assert [row["budget"] for row in sel.region_table] == [2, 2, 2]
    assert [row["verified"] for row in sel.region_table] == [0, 0, 0]
    assert len(sel) == 6


def test_target_sees_only_verified_samples() -> None:
    rng = np.random.default_rng(0)
    scores = rng.gamma(2.0, size=2000)
    verifier = CountingVerifier(scores, np.ones(2000))
    sel = staff_select(scores, 200, regions=20, verify_per_region=5, verify=verifier, seed=1)
    assert verifier.calls == 1
    assert len(verifier.seen) == sel.info["n_verified"] <= 20 * 5
    assert len(set(verifier.seen)) == len(verifier.seen)
    assert len(sel) == 200


def test_seed_determinism() -> None:
    rng = np.random.default_rng(0)
    scores = rng.gamma(2.0, size=500)
    verifier = CountingVerifier(scores, rng.uniform(0.5, 2, size=500))
    a = staff_select(scores, 100, regions=10, verify_per_region=5, verify=verifier, seed=7)
    b = staff_select(scores, 100, regions=10, verify_per_region=5, verify=verifier, seed=7)
    c = staff_select(scores, 100, regions=10, verify_per_region=5, verify=verifier, seed=8)
    assert a.indices.tolist() == b.indices.tolist()
    assert a.indices.tolist() != c.indices.tolist()


def test_degenerate_inputs() -> None:
    flat = np.ones(8)
    verifier = CountingVerifier(flat, np.ones(8))
    sel = staff_select(flat, 3, regions=50, verify_per_region=2, verify=verifier, seed=0)
    assert len(sel) == 3 and sel.info["n_regions"] == 1
    verifier = CountingVerifier(SCORES, np.ones(10))
    everything = staff_select(SCORES, 10, regions=4, verify_per_region=3, verify=verifier, seed=0)
    assert everything.indices.tolist() == list(range(10))


def test_low_agreement_warns(caplog: pytest.LogCaptureFixture) -> None:
    scores = np.arange(1.0, 101.0)
    verifier = CountingVerifier(scores, 1.0 / scores**2)  # target = 1/score: perfectly reversed
    with caplog.at_level(logging.WARNING):
        sel = staff_select(scores, 10, regions=5, verify_per_region=4, verify=verifier, seed=0)
    assert sel.info["agreement"]["spearman"] == pytest.approx(-1.0)
    assert "agreement is low" in caplog.text


def test_stage_timer_is_exclusive() -> None:
    timer = StageTimer()
    with timer.stage("outer"):
        sum(range(10000))
        with timer.stage("inner"):
            sum(range(200000))
    assert timer.timings["inner"] > timer.timings["outer"] > 0


@pytest.mark.parametrize("select", [staff_select, staff_reference_select])
def test_budget_rule_is_check_budget(select) -> None:  # type: ignore[no-untyped-def]
    # m = 0 is allowed, as by every method's check_budget: an empty selection, no target call.
    verifier = CountingVerifier(SCORES, np.ones(10))
    empty = select(SCORES, 0, regions=3, verify_per_region=2, verify=verifier, seed=0)
    assert len(empty) == 0 and empty.budget == 0 and verifier.calls == 0
    for m in (-1, 11):
        with pytest.raises(ValueError) as expected:
            check_budget(m, len(SCORES))
        with pytest.raises(ValueError) as got:
            select(SCORES, m, regions=3, verify_per_region=2, verify=verifier, seed=0)
        assert str(got.value) == str(expected.value)


def test_scores_must_be_one_dimensional() -> None:
    with pytest.raises(ValueError, match="1-D"):
        staff_select(np.ones((2, 5)), 3, regions=3, verify_per_region=2, verify=None)


@pytest.mark.parametrize(
    ("allocation", "expected"),
    [("paper", [0, 1, 2, 3, 4, 5]), ("reference", [1, 2, 3, 4, 5, 8])],
)
def test_method_runs_the_chosen_allocation(allocation: str, expected: list[int]) -> None:
    # The cases of test_fill_tops_up_from_largest_v_first and test_reference_allocation_by_hand,
    # through the registered method and its settings.
    import contextlib
    from collections.abc import Iterator

    from speccore.config import SelectConfig
    from speccore.selection.base import get_method

    config = SelectConfig.from_dict(
        {
            "data": "fake.jsonl",
            "allocation": allocation,
            "prune_rate": 0.4,
            "regions": 3,
            "verify_per_region": 2,
        }
    )
    factor = np.array([2, 2, 2, 3, 3, 3, 1, 1, 1, 1.0])

    class Provider:
        n = 10

        def __init__(self) -> None:
            self.config = config

        verifier = CountingVerifier(SCORES, factor)

        def get(self, work, rows=None) -> np.ndarray:  # type: ignore[no-untyped-def]
            if work.model == "small":
                return SCORES
            assert work.some_rows and rows is not None
            return self.verifier(rows)

        @contextlib.contextmanager
        def stage(self, name: str) -> Iterator[None]:
            yield

    sel = get_method("staff").select(Provider(), 6, seed=3)  # type: ignore[arg-type]
    assert sel.info["allocation"] == allocation
    assert sel.indices.tolist() == expected
