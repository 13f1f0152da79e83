"""Baselines of the STAFF paper (random, GraNd, EL2N, CCS, STAFF target-only; D2 through its
method class): hand-worked selections, seeds, budgets, degenerate inputs, and the registry."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest

import speccore.selection.ccs
import speccore.selection.d2
import speccore.selection.random
import speccore.selection.score_based
import speccore.selection.target_only  # noqa: F401  (fills the registry)
from speccore.config import SelectConfig, coreset_size
from speccore.selection.base import Selection, get_method, method_names, rng_for
from speccore.selection.ccs import (
    ccs_select,
    effective_cutoff,
    equal_width_strata,
    stratified_budget_loop,
    stratum_budgets,
)
from speccore.selection.random import random_select
from speccore.selection.score_based import top_m
from speccore.utils.errors import ConfigError, ScoringError

BASELINES = ["ccs", "d2", "el2n", "grand", "random", "staff-target-only"]


class FakeProvider:
    """Arrays in, calls counted. The baselines must never touch the small model."""

    def __init__(
        self,
        n: int,
        *,
        tuned: dict[str, np.ndarray] | None = None,
        untuned: dict[str, np.ndarray] | None = None,
        embeddings: np.ndarray | None = None,
        config: SelectConfig | None = None,
    ) -> None:
        self.n = n
        self.config = config or SelectConfig.from_dict({"data": "fake.jsonl"})
        self._scores = {True: tuned or {}, False: untuned or {}}
        self._embeddings = embeddings
        self.calls: Counter[tuple] = Counter()
        self.stages: list[str] = []
        self._open: str | None = None

    def get(self, work, rows=None) -> np.ndarray:  # type: ignore[no-untyped-def]
        assert work.model == "target", f"a baseline asked the small model for {work}"
        assert rows is None and not work.some_rows
        if work.output == "embedding":
            assert work.tuned
            return self.target_embeddings()
        return self.target_scores(work.output, work.tuned)

    def target_scores(self, score: str, tuned: bool) -> np.ndarray:
        assert self._open is not None, "target scores asked for outside a stage"
        self.calls["target_scores", score, tuned] += 1
        return self._scores[tuned][score].copy()

    def target_embeddings(self) -> np.ndarray:
        assert self._open is not None, "embeddings asked for outside a stage"
        self.calls["target_embeddings",] += 1
        assert self._embeddings is not None
        return self._embeddings

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.stages.append(name)
        self._open = name
        try:
            yield
        finally:
            self._open = None


# --- registry -------------------------------------------------------------------------------


def test_every_baseline_is_registered():
    assert set(BASELINES) <= set(method_names())


def test_unknown_method_lists_the_valid_names():
    with pytest.raises(ConfigError) as err:
        get_method("grandd")
    assert "'grandd'" in str(err.value)
    for name in BASELINES:
        assert name in str(err.value)


# --- top-m: GraNd and EL2N ------------------------------------------------------------------

# index:          0    1    2    3    4    5    6    7    8    9
HAND = np.array([0.5, 0.9, 0.1, 0.9, 0.3, 0.7, 0.2, 0.9, 0.0, 0.6])


def test_top_m_hand_worked():
    # 0.9 at 1, 3, 7 are the three highest; ties go to the lower index, so m = 2 keeps 1 and 3.
    assert top_m(HAND, 3).tolist() == [1, 3, 7]
    assert top_m(HAND, 2).tolist() == [1, 3]
    # Next come 0.7 (5), 0.6 (9), 0.5 (0).
    assert top_m(HAND, 6).tolist() == [1, 3, 7, 5, 9, 0]
    assert sorted(top_m(HAND, 10).tolist()) == list(range(10))  # p = 0 keeps everything
    assert top_m(np.full(5, 2.0), 3).tolist() == [0, 1, 2]  # all equal: lowest indices


def test_top_m_rejects_bad_input():
    with pytest.raises(ScoringError, match="sample 2"):
        top_m(np.array([1.0, 2.0, np.nan]), 1)
    with pytest.raises(ValueError, match="budget"):
        top_m(HAND, 11)


@pytest.mark.parametrize(("name", "score"), [("grand", "effort"), ("el2n", "el2n")])
def test_score_methods_use_their_score_on_the_tuned_target(name, score):
    other = "el2n" if score == "effort" else "effort"
    provider = FakeProvider(10, tuned={score: HAND, other: -HAND})
    sel = get_method(name).select(provider, 3, seed=0)
    assert isinstance(sel, Selection)
    assert sel.indices.tolist() == [1, 3, 7]
    assert sel.method == name and sel.budget == 3 and sel.n_total == 10 and len(sel) == 3
    np.testing.assert_array_equal(sel.scores, HAND)
    assert provider.calls == Counter({("target_scores", score, True): 1})
    assert provider.stages == ["target setup", "selection"]
    assert sel.timings == {} and sel.config == {}
    # No randomness: another seed gives the same coreset.
    assert get_method(name).select(provider, 3, seed=9).indices.tolist() == [1, 3, 7]


# --- random ---------------------------------------------------------------------------------


def test_random_budget_seed_and_range():
    a = random_select(1000, 100, rng_for(0, 1))
    assert len(a) == 100 and len(np.unique(a)) == 100 and a.min() >= 0 and a.max() < 1000
    np.testing.assert_array_equal(a, random_select(1000, 100, rng_for(0, 1)))
    assert not np.array_equal(a, random_select(1000, 100, rng_for(1, 1)))
    assert random_select(7, 7, rng_for(0)).tolist() == list(range(7))  # p = 0


def test_random_is_uniform():
    # 3000 draws of 3 out of 10: each index is kept 900 times on average (sd ≈ 25).
    counts = np.zeros(10)
    for seed in range(3000):
        counts[random_select(10, 3, rng_for(seed))] += 1
    assert np.all(np.abs(counts - 900) < 150)


def test_random_method_needs_no_model():
    provider = FakeProvider(50)
    sel = get_method("random").select(provider, 20, seed=4)
    assert len(sel) == 20 and provider.calls == Counter()
    assert sel.indices.tolist() == get_method("random").select(provider, 20, 4).indices.tolist()
    assert sel.indices.tolist() != get_method("random").select(provider, 20, 5).indices.tolist()


# --- CCS ------------------------------------------------------------------------------------


def test_equal_width_strata_hand_worked():
    # [0, 10] in K = 4 bins of width 2.5: 0 → 0, 2.5 → 1, 4.9 → 1, 5 → 2, 7.4 → 2, 10 → 3 (max).
    ids = equal_width_strata(np.array([0.0, 2.5, 4.9, 5.0, 7.4, 10.0]), 4)
    assert ids.tolist() == [0, 1, 1, 2, 2, 3]
    assert equal_width_strata(np.full(4, 3.0), 50).tolist() == [0, 0, 0, 0]
    with pytest.raises(ConfigError):
        equal_width_strata(np.arange(3.0), 0)


def test_stratum_budgets_hand_worked():
    # Sizes (10, 1, 1), m = 6, smallest first: 1 → min(1, ⌊6/3⌋=2) = 1 (r 5);
    # 1 → min(1, ⌊5/2⌋=2) = 1 (r 4); 10 → min(10, ⌊4/1⌋) = 4.
    assert stratum_budgets([10, 1, 1], 6).tolist() == [4, 1, 1]
    # Sizes (3, 3, 3), m = 7, equal sizes in order: ⌊7/3⌋ = 2 (r 5), ⌊5/2⌋ = 2 (r 3), 3.
    assert stratum_budgets([3, 3, 3], 7).tolist() == [2, 2, 3]
    # Sizes (2, 8), m = 10: everything.
    assert stratum_budgets([2, 8], 10).tolist() == [2, 8]


def test_budget_loop_never_falls_short():
    # Smallest first, the loop spends exactly min(m, Σ sizes) (proof in ccs.py's docstring).
    rng = np.random.default_rng(0)
    for _ in range(500):
        sizes = rng.integers(1, 30, size=rng.integers(1, 12))
        m = int(rng.integers(0, sizes.sum() + 1))
        budgets = stratum_budgets(sizes, m)
        assert budgets.sum() == m and (budgets <= sizes).all() and (budgets >= 0).all()


def test_stratified_budget_loop_draws_within_strata():
    strata = [np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]), np.array([10]), np.array([], int)]
    picked = stratified_budget_loop(strata, 4, rng_for(0))
    # Empty stratum ignored; {10} gets min(1, ⌊4/2⌋) = 1; the big one gets 3.
    assert 10 in picked.tolist() and len(picked) == 4 and len(np.unique(picked)) == 4


# Scores of the CCS hand example (N = 10):
#   index:   0  1  2  3  4    5  6  7  8  9
CCS_HAND = np.array([1, 9, 2, 8, 3, 100, 2, 1, 9, 5], dtype=float)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ccs_hand_worked(seed):
    # m = 4 (p = 0.6), β = 0.1 → β' = min(0.1, 0.6) = 0.1: cut ⌊0.1·10⌋ = 1 sample, 5 (score 100).
    # Remaining scores over [1, 9], K = 2 strata of width 4:
    #   stratum 0 = [1, 5): samples 0, 2, 4, 6, 7;   stratum 1 = [5, 9]: samples 1, 3, 8, 9.
    # Smallest first: stratum 1 → min(4, ⌊4/2⌋) = 2; stratum 0 → min(5, ⌊2/1⌋) = 2. Total 4 = m.
    picked, info = ccs_select(CCS_HAND, 4, beta=0.1, strata=2, rng=rng_for(seed))
    assert len(picked) == 4 and 5 not in picked.tolist()
    assert len(set(picked.tolist()) & {1, 3, 8, 9}) == 2
    assert len(set(picked.tolist()) & {0, 2, 4, 6, 7}) == 2
    assert info["n_cut"] == 1 and info["beta_effective"] == 0.1
    assert info["n_strata"] == 2 and info["n_selected"] == 4
    table = info["region_table"]
    assert [(r["region"], r["size"], r["budget"], r["taken"]) for r in table] == [
        (0, 5, 2, 2),
        (1, 4, 2, 2),
    ]
    assert (table[1]["score_lo"], table[1]["score_hi"]) == (5.0, 9.0)


def test_ccs_cutoff_is_lowered_so_m_stays_reachable():
    # β = 0.5 but m = 8 of 10: β' = min(0.5, 1 − 8/10) = 0.2 → cut 2: 100 (sample 5), then the
    # 9s at 1 and 8 tie → the lower index, 1. The 8 samples left are exactly m: all kept.
    picked, info = ccs_select(CCS_HAND, 8, beta=0.5, strata=3, rng=rng_for(0))
    assert sorted(picked.tolist()) == [0, 2, 3, 4, 6, 7, 8, 9]
    assert info["n_cut"] == 2
    # β' read exactly: 0.29·100 is 28.999… in floating point, but the user meant 29.
    assert effective_cutoff(100, 50, 0.29) == 29
    assert effective_cutoff(1000, coreset_size(1000, 0.9), 0.1) == 100


def test_ccs_p_zero_keeps_everything():
    # m = N → β' = min(0.1, 0) = 0: nothing cut, every stratum fully taken.
    picked, info = ccs_select(CCS_HAND, 10, beta=0.1, strata=50, rng=rng_for(0))
    assert sorted(picked.tolist()) == list(range(10)) and info["n_cut"] == 0


def test_ccs_all_scores_equal_is_one_stratum():
    # All equal: β = 0.2 cuts 2 (ties: lower indices 0, 1 first), one stratum {2..9}, 5 of it.
    picked, info = ccs_select(np.ones(10), 5, beta=0.2, strata=50, rng=rng_for(0))
    assert info["n_strata"] == 1 and info["n_cut"] == 2
    assert len(picked) == 5 and set(picked.tolist()) <= set(range(2, 10))


def test_ccs_seeded():
    s = np.random.default_rng(0).random(1000)
    a, info = ccs_select(s, 100, beta=0.1, strata=50, rng=rng_for(0))
    b, _ = ccs_select(s, 100, beta=0.1, strata=50, rng=rng_for(0))
    c, _ = ccs_select(s, 100, beta=0.1, strata=50, rng=rng_for(1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(a) == len(c) == info["n_selected"] == 100


def test_ccs_method_uses_el2n_on_the_tuned_target():
    cfg = SelectConfig.from_dict(dict(data="x", regions=2, ccs_beta=0.1))
    provider = FakeProvider(10, tuned={"el2n": CCS_HAND}, config=cfg)
    sel = get_method("ccs").select(provider, 4, seed=3)
    assert len(sel) == 4 and 5 not in sel.indices.tolist()
    assert provider.calls == Counter({("target_scores", "el2n", True): 1})
    assert sel.info["n_cut"] == 1 and "region_table" not in sel.info
    assert [r["taken"] for r in sel.region_table] == [2, 2]
    again = get_method("ccs").select(provider, 4, seed=3)
    np.testing.assert_array_equal(sel.indices, again.indices)


# --- STAFF target-only ----------------------------------------------------------------------

# Untuned-target scores:  index 0   1  2  3  4  5  6  7
TARGET_HAND = np.array([0.0, 10, 1, 9, 2, 3, 8, 4])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_target_only_hand_worked(seed):
    # [0, 10] in K = 2 regions of width 5: region 0 = [0, 5): samples 0, 2, 4, 5, 7;
    # region 1 = [5, 10]: samples 1, 3, 6. No cutoff. m = 6, smallest first:
    # region 1 → min(3, ⌊6/2⌋ = 3) = 3 (all of it, the top score 10 included);
    # region 0 → min(5, ⌊3/1⌋) = 3.
    cfg = SelectConfig.from_dict(dict(data="x", regions=2, score="loss"))
    provider = FakeProvider(8, untuned={"loss": TARGET_HAND}, config=cfg)
    sel = get_method("staff-target-only").select(provider, 6, seed=seed)
    kept = set(sel.indices.tolist())
    assert {1, 3, 6} <= kept and len(kept & {0, 2, 4, 5, 7}) == 3 and len(sel) == 6
    assert sel.regions is not None and sel.regions.tolist() == [0, 1, 0, 1, 0, 0, 1, 0]
    assert provider.calls == Counter({("target_scores", "loss", False): 1})
    assert provider.stages == ["target setup", "selection"]
    assert sel.info["n_regions"] == 2 and sel.info["n_selected"] == 6


def test_target_only_seeded_and_p_zero():
    s = np.random.default_rng(1).random(500)
    provider = FakeProvider(500, untuned={"effort": s})
    method = get_method("staff-target-only")
    a, b = method.select(provider, 50, 0), method.select(provider, 50, 0)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, method.select(provider, 50, 1).indices)
    assert len(a) == 50
    assert len(method.select(provider, 500, 0)) == 500


def test_target_only_all_scores_equal():
    provider = FakeProvider(20, untuned={"effort": np.full(20, 0.7)})
    sel = get_method("staff-target-only").select(provider, 5, seed=0)
    assert len(sel) == 5 and sel.info["n_regions"] == 1


# --- D2 through its method class ------------------------------------------------------------


def _d2_provider(strata: int | None) -> FakeProvider:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cfg = SelectConfig.from_dict(dict(data="x", d2_k=4, d2_strata=strata, ccs_beta=0.1))
    return FakeProvider(60, tuned={"el2n": rng.random(60)}, embeddings=x, config=cfg)


@pytest.mark.parametrize("strata", [None, 3])
def test_d2_method(strata):
    provider = _d2_provider(strata)
    sel = get_method("d2").select(provider, 12, seed=0)
    assert len(sel) == 12 and sel.info["k"] == 4 and sel.info["strata"] == strata
    assert provider.calls == Counter(
        {("target_scores", "el2n", True): 1, ("target_embeddings",): 1}
    )
    assert provider.stages == ["target setup", "selection"]
    assert bool(sel.region_table) == (strata is not None)
    # Deterministic: no seed involved.
    np.testing.assert_array_equal(sel.indices, get_method("d2").select(provider, 12, 7).indices)
    sel.to_dict()  # JSON-ready info


def test_top_mask_equals_the_sorted_cut_with_ties():
    from speccore.selection.ccs import top_mask
    from speccore.selection.score_based import rank_descending

    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 60))
        scores = rng.integers(0, 5, size=n).astype(float)  # many ties
        k = int(rng.integers(0, n + 1))
        expected = np.zeros(n, dtype=bool)
        expected[rank_descending(scores)[:k]] = True
        np.testing.assert_array_equal(top_mask(scores, k), expected)
