"""D2 Pruning: hand-worked graphs, the sparse heap implementation against a dense brute force,
degenerate inputs, and why the features must be L2-normalised."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import scipy.sparse as sp

from conftest import tol
from speccore.selection.ccs import ccs_strata, stratum_budgets
from speccore.selection.d2 import (
    d2_select,
    d2_select_stratified,
    forward_message_passing,
    knn_graph,
)
from speccore.selection.score_based import top_m
from speccore.utils.errors import ConfigError

LN2 = math.log(2.0)


def d2_select_dense(
    x: np.ndarray, s: np.ndarray, m: int, *, k: int, gamma_f: float, gamma_r: float
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force D2 straight from the paper's formulas: dense N×N distances, O(N²) per pick.

    Returns (picks in order, forward scores)."""
    n = len(x)
    k = min(k, n - 1)
    d = np.linalg.norm(x[:, None, :] - x[None, :, :], axis=2)
    adj = np.zeros((n, n), dtype=bool)
    if k > 0:
        nearest = np.argsort(d + np.diag(np.full(n, np.inf)), axis=1, kind="stable")[:, :k]
        adj[np.repeat(np.arange(n), k), nearest.ravel()] = True
    adj |= adj.T
    forward = s + np.where(adj, np.exp(-gamma_f * d), 0.0) @ s
    w_r = np.exp(-gamma_r * d)
    cur = forward.copy()
    alive = np.ones(n, dtype=bool)
    picked = []
    for _ in range(m):
        i = int(np.argmax(np.where(alive, cur, -np.inf)))  # first maximum: lower index
        picked.append(i)
        alive[i] = False
        nb = adj[i] & alive
        cur[nb] -= w_r[i, nb] * cur[i]
    return np.array(picked, dtype=np.int64), forward


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --- hand-worked examples -------------------------------------------------------------------


def test_hand_worked_line_graph():
    # Points on a line at 0, 1, 3 (samples 0, 1, 2), k = 1:
    #   kNN(0) = 1 (d 1), kNN(1) = 0 (d 1 < 2), kNN(2) = 1 (d 2) → edges {0,1} d=1, {1,2} d=2.
    # γ_f = ln 2, so the forward weights are 2^-d: 1/2 on {0,1}, 1/4 on {1,2}. With s = (1, 4, 8):
    #   s'_0 = 1 + 4/2 = 3;  s'_1 = 4 + 1/2 + 8/4 = 6.5;  s'_2 = 8 + 4/4 = 9.
    x = np.array([[0.0], [1.0], [3.0]])
    s = np.array([1.0, 4.0, 8.0])
    graph = knn_graph(x, 1)
    assert graph.nnz == 4
    np.testing.assert_allclose(graph.toarray(), [[0, 1, 0], [1, 0, 2], [0, 2, 0]])
    np.testing.assert_allclose(forward_message_passing(graph, s, LN2), [3.0, 6.5, 9.0])
    # γ_r = 0 (reverse weight 1): pick 2 (9); its neighbour 1 → 6.5 − 9 = −2.5; then 0 (3 > −2.5).
    picked, _ = d2_select(x, s, 2, k=1, gamma_f=LN2, gamma_r=0.0)
    assert picked.tolist() == [2, 0]
    # Top-2 by raw score is {2, 1}: the reverse message made D2 pick differently.
    assert sorted(top_m(s, 2).tolist()) == [1, 2]
    # γ_r = ln 2 (reverse weight 1/4 on {1,2}): 1 → 6.5 − 9/4 = 4.25 > 3, so pick 2 then 1.
    picked, _ = d2_select(x, s, 2, k=1, gamma_f=LN2, gamma_r=LN2)
    assert picked.tolist() == [2, 1]


def test_hand_worked_duplicates_have_weight_one():
    # Samples 0, 1 share a feature, and so do 2, 3 (distance 0, far from the other pair), k = 1:
    # edges {0,1} and {2,3} at distance 0, weight exp(0) = 1 both ways. s = (4, 3, 2, 0):
    #   s' = (4+3, 3+4, 2+0, 0+2) = (7, 7, 2, 2).
    # Pick 0 (7, tie with 1 → lower index); 1 → 7 − 1·7 = 0. Pick 2 (2, tie with 3); 3 → 2 − 2 = 0.
    # Then 1 and 3 tie at 0 → 1.  Top-2 by score would be {0, 1}: both from the same pair.
    x = np.array([[0.0, 0.0], [0.0, 0.0], [10.0, 0.0], [10.0, 0.0]])
    s = np.array([4.0, 3.0, 2.0, 0.0])
    graph = knn_graph(x, 1)
    assert graph.nnz == 4  # the zero distances are stored edges, not "no edge"
    np.testing.assert_array_equal(graph.data, 0.0)
    np.testing.assert_allclose(forward_message_passing(graph, s, 1.0), [7, 7, 2, 2])
    picked, info = d2_select(x, s, 3, k=1, gamma_f=1.0, gamma_r=0.1)
    assert picked.tolist() == [0, 2, 1]
    assert info["n_edges"] == 2 and info["median_neighbor_distance"] == 0.0


def test_all_zero_scores_pick_in_index_order():
    # s = 0 everywhere: every message is w·0 = 0, so all s' stay 0 and ties go to lower indices.
    x = np.random.default_rng(0).standard_normal((20, 3))
    picked, _ = d2_select(x, np.zeros(20), 5, k=3)
    assert picked.tolist() == [0, 1, 2, 3, 4]


# --- sparse heap vs dense brute force -------------------------------------------------------


@pytest.mark.parametrize(
    ("seed", "k", "gamma_f", "gamma_r"),
    [(0, 5, 1.0, 0.1), (1, 3, 0.5, 2.0), (2, 8, 3.0, 0.0), (3, 5, 0.0, 1.0), (4, 1, 1.0, 0.5)],
)
def test_sparse_heap_matches_dense_brute_force(seed, k, gamma_f, gamma_r):
    rng = np.random.default_rng(seed)
    x = unit_rows(rng.standard_normal((300, 8)))
    s = rng.random(300)
    expected, forward = d2_select_dense(x, s, 120, k=k, gamma_f=gamma_f, gamma_r=gamma_r)
    graph = knn_graph(x, k)
    # float64, the same formula two ways: a distance is a norm over 8 dimensions (relative
    # error up to 9 eps), which exp(-gamma_f * d) multiplies by gamma_f * d <= 3 * 2; the dense
    # reference then sums a row of 300 weighted scores.
    rtol = tol(np.float64, 300 + 2 * 3 * 9)
    np.testing.assert_allclose(forward_message_passing(graph, s, gamma_f), forward, rtol=rtol)
    picked, info = d2_select(x, s, 120, k=k, gamma_f=gamma_f, gamma_r=gamma_r)
    np.testing.assert_array_equal(picked, expected)
    assert info["n_selected"] == 120 and len(set(picked.tolist())) == 120


def test_graph_is_sparse_symmetric_and_holds_each_knn():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((200, 4))
    graph = knn_graph(x, 5)
    assert sp.issparse(graph) and graph.shape == (200, 200)
    assert 5 * 200 <= graph.nnz <= 2 * 5 * 200  # k out-edges each, at most doubled
    assert (graph != graph.T).nnz == 0
    assert graph.diagonal().sum() == 0 and (graph.getnnz(axis=1) >= 5).all()


# --- degenerate inputs ----------------------------------------------------------------------


def test_k_at_least_n_uses_everyone_else():
    # k = 10 ≥ N = 4 → k = 3: the complete graph.
    rng = np.random.default_rng(6)
    x, s = rng.standard_normal((4, 2)), rng.random(4)
    assert knn_graph(x, 10).nnz == 4 * 3
    picked, info = d2_select(x, s, 2, k=10)
    expected, _ = d2_select_dense(x, s, 2, k=3, gamma_f=1.0, gamma_r=0.1)
    np.testing.assert_array_equal(picked, expected)
    assert info["k"] == 3


def test_single_sample_and_budget_extremes():
    assert d2_select(np.ones((1, 3)), np.array([0.5]), 1, k=5)[0].tolist() == [0]
    x, s = np.random.default_rng(7).standard_normal((30, 4)), np.arange(30.0)
    assert sorted(d2_select(x, s, 30, k=5)[0].tolist()) == list(range(30))  # p = 0 keeps all
    assert d2_select(x, s, 0, k=5)[0].tolist() == []


def test_all_equal_scores_still_give_m_distinct():
    x = np.random.default_rng(8).standard_normal((50, 4))
    picked, _ = d2_select(x, np.full(50, 0.3), 17, k=5)
    assert len(set(picked.tolist())) == 17
    np.testing.assert_array_equal(picked, d2_select(x, np.full(50, 0.3), 17, k=5)[0])


def test_bad_arguments():
    x, s = np.zeros((5, 2)), np.zeros(5)
    with pytest.raises(ConfigError, match="d2-k"):
        d2_select(x, s, 2, k=0)
    with pytest.raises(ConfigError, match="gamma"):
        d2_select(x, s, 2, gamma_r=-1.0)
    with pytest.raises(ConfigError, match="d2-strata"):
        d2_select_stratified(x, s, 2, strata=0, beta=0.1)
    with pytest.raises(ValueError, match="features"):
        d2_select(np.zeros((4, 2)), s, 2)
    with pytest.raises(ValueError, match="budget"):
        d2_select(x, s, 6)


# --- normalisation matters ------------------------------------------------------------------


def clustered(seed: int, spread: float = 0.05) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """5 clusters of 40 unit vectors in 16-d; cluster 0 is the hard one (scores 0.8–1.0), the
    others score 0–0.5. Returns (features, scores, cluster of each sample)."""
    rng = np.random.default_rng(seed)
    centres = unit_rows(rng.standard_normal((5, 16)))
    cluster = np.repeat(np.arange(5), 40)
    x = unit_rows(centres[cluster] + spread * rng.standard_normal((200, 16)))
    s = np.where(cluster == 0, rng.uniform(0.8, 1.0, 200), rng.uniform(0.0, 0.5, 200))
    return x, s, cluster


def test_message_passing_changes_the_ranking_on_normalised_features():
    x, s, cluster = clustered(0)
    # Top-20 by score all come from cluster 0, the only one scoring above 0.5.
    assert set(cluster[top_m(s, 20)].tolist()) == {0}
    # Within a cluster the 5-NN lie at d ≈ 0.05·√(2·16) ≈ 0.3, so a pick lowers each neighbour
    # by exp(−0.1·0.3)·s' ≈ 0.97·s' ≥ its own s' (s' of the pick is the max): picked
    # neighbourhoods drop to ≤ 0 and D2 moves on to other clusters.
    picked, info = d2_select(x, s, 20, k=5, gamma_f=1.0, gamma_r=0.1)
    assert info["median_neighbor_distance"] < 1.0
    assert set(picked.tolist()) != set(top_m(s, 20).tolist())
    assert len(set(cluster[picked].tolist())) >= 3


def test_unnormalised_features_turn_d2_into_top_m(caplog):
    x, s, _ = clustered(0)
    # Scale so the median neighbour distance is ~30 (like raw hidden states): exp(−30) ≈ 1e-13.
    graph = knn_graph(x, 5)
    raw = x * (30.0 / float(np.median(graph.data)))
    forward = forward_message_passing(knn_graph(raw, 5), s, 1.0)
    # The closest pairs still lie at d ≈ 15–20 (exp(−15) ≈ 3e-7 per neighbour): the forward
    # messages vanish next to the score gaps, whereas on unit vectors they are the same size.
    np.testing.assert_allclose(forward, s, rtol=1e-4)
    assert np.abs(forward_message_passing(graph, s, 1.0) - s).min() > 0.1
    # With γ_r = γ_f = 1 the reverse messages vanish too: D2 is exactly top-m by score.
    with caplog.at_level(logging.WARNING, logger="speccore.selection.d2"):
        picked, info = d2_select(raw, s, 20, k=5, gamma_f=1.0, gamma_r=1.0)
    np.testing.assert_array_equal(picked, top_m(s, 20))
    assert info["median_neighbor_distance"] == pytest.approx(30.0, rel=0.2)
    assert "normalise" in caplog.text


# --- the D2 paper's stratified pipeline -----------------------------------------------------


def test_stratified_with_one_stratum_and_no_cutoff_is_global_d2():
    x, s, _ = clustered(1)
    picked, info = d2_select_stratified(x, s, 30, strata=1, beta=0.0, k=5)
    np.testing.assert_array_equal(picked, d2_select(x, s, 30, k=5)[0])
    assert info["n_cut"] == 0 and info["n_strata"] == 1


def test_stratified_hand_worked_budgets_and_cutoff():
    # N = 10, m = 4, β = 0.1 → β' = min(0.1, 1 − 4/10) = 0.1, cut ⌊0.1·10⌋ = 1: sample 5 (100).
    # The rest (1, 9, 2, 8, 3, ·, 2, 1, 9, 5) over [1, 9] in K = 2 strata of width 4:
    #   stratum 0 = [1, 5): samples 0, 2, 4, 6, 7;  stratum 1 = [5, 9]: samples 1, 3, 8, 9.
    # Smallest first: stratum 1 gets min(4, ⌊4/2⌋) = 2, then stratum 0 min(5, ⌊2/1⌋) = 2.
    s = np.array([1, 9, 2, 8, 3, 100, 2, 1, 9, 5], dtype=float)
    x = np.random.default_rng(2).standard_normal((10, 3))
    picked, info = d2_select_stratified(x, s, 4, strata=2, beta=0.1, k=2)
    assert 5 not in picked.tolist()
    assert len(set(picked.tolist()) & {1, 3, 8, 9}) == 2
    assert len(set(picked.tolist()) & {0, 2, 4, 6, 7}) == 2
    assert info["n_cut"] == 1 and info["n_strata"] == 2 and info["n_selected"] == 4
    assert [r["taken"] for r in info["region_table"]] == [2, 2]


def test_stratified_matches_dense_within_each_stratum():
    rng = np.random.default_rng(3)
    x, s = unit_rows(rng.standard_normal((400, 6))), rng.random(400)
    picked, _ = d2_select_stratified(x, s, 80, strata=4, beta=0.1, k=5)
    groups, _ = ccs_strata(s, 80, beta=0.1, strata=4)
    members = list(groups.values())
    budgets = stratum_budgets([len(g) for g in members], 80)
    expected = [
        g[d2_select_dense(x[g], s[g], int(b), k=5, gamma_f=1.0, gamma_r=0.1)[0]]
        for g, b in zip(members, budgets, strict=True)
    ]
    assert sorted(picked.tolist()) == sorted(np.concatenate(expected).tolist())
    assert len(picked) == 80
