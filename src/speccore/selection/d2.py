"""D2 Pruning (Maharana et al., "D2 Pruning: Message Passing for Balancing Diversity & Difficulty
in Data Pruning", ICLR 2024), with EL2N on the fully tuned target as difficulty.

The data is a graph: node i = sample i with feature x_i (the tuned target's mean last-layer hidden
state over the response, L2-normalised) and difficulty s_i (EL2N). Edges join each sample to its
k nearest neighbours (Euclidean), symmetrised: i ~ j if i ∈ kNN(j) or j ∈ kNN(i); d_ij = ‖x_i − x_j‖₂.

1. Forward message passing, once: s'_i = s_i + Σ_{j ~ i} exp(−γ_f·d_ij)·s_j
   (a sample in a dense neighbourhood of hard samples becomes more important).
2. Reverse message passing selection, m times: pick i* = argmax s' over the samples left (ties:
   lower index); every neighbour j of i* still left gets s'_j ← s'_j − exp(−γ_r·d_{i*j})·s'_{i*}
   (its neighbourhood is now represented, so it becomes less important); remove i*.

With ``strata`` set this is the D2 paper's full pipeline instead: CCS's hard cutoff (β' = min(β,
1 − m/N)), K equal-width strata over the remaining scores, CCS's per-stratum budgets, and steps 1–2
within each stratum on the stratum's own kNN graph.

Why the features must be normalised: on raw hidden states the median 5-NN distance is about 14
for SmolLM2 and 37 for Gemma, so exp(−γ_f·d) is 1e-6 to 1e-16. The forward messages vanish, only
a weak reverse suppression is left (exp(−0.1·37) ≈ 0.025), and D2 silently drifts to top-m by
score (with γ_r = γ_f it is exactly top-m). On unit vectors d ∈ [0, 2] and the weights lie in
[e⁻², 1]. A warning is logged when the median neighbour distance makes the forward weights
negligible.

Cost: a sparse graph of at most 2·k·N edges (never a dense N×N matrix), exact kNN by
scikit-learn, and a lazy max-heap for step 2, O(m·k·log N).
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..utils.errors import ConfigError
from .base import (
    MethodSettings,
    ModelWork,
    RunConfig,
    ScoreProvider,
    Selection,
    SelectionMethod,
    register_method,
)
from .ccs import ccs_strata, stratum_budgets, stratum_table
from .score_based import TARGET_STAGE, check_budget, check_scores, tuned_target

logger = logging.getLogger(__name__)

# exp(−20) ≈ 2e-9: forward messages this small only reorder scores closer than ~1e-8.
NEGLIGIBLE_EXPONENT = 20.0
_PAIR_CHUNK = 1 << 16


def knn_graph(features: np.ndarray, k: int) -> sp.csr_matrix:
    """Symmetrised k-nearest-neighbour graph as an N×N CSR matrix of Euclidean distances.

    Entry (i, j) is stored iff i ∈ kNN(j) or j ∈ kNN(i) (a sample is not its own neighbour);
    duplicate features give stored zeros, which must not be read as "no edge". k ≥ N uses
    k = N − 1. Column indices are sorted within each row.
    """
    x = _as_features(features)
    n = len(x)
    k = min(k, n - 1)
    if k < 1:
        return sp.csr_matrix((n, n), dtype=np.float64)
    from sklearn.neighbors import NearestNeighbors

    # Without a query, sklearn leaves each sample out of its own neighbours (by index, so
    # duplicates of it can still be neighbours).
    neigh = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(return_distance=False)
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    cols = neigh.ravel().astype(np.int64)
    lo, hi = np.minimum(rows, cols), np.maximum(rows, cols)
    keys = np.unique(lo[lo != hi] * n + hi[lo != hi])  # each undirected edge once
    lo, hi = np.divmod(keys, n)
    return _symmetric_csr(n, lo, hi, _pair_distances(x, lo, hi))


def forward_message_passing(graph: sp.csr_matrix, scores: np.ndarray, gamma_f: float) -> np.ndarray:
    """Step 1: s' = s + W·s with W_ij = exp(−γ_f·d_ij) on the graph's edges."""
    weights = graph.copy()
    weights.data = np.exp(-gamma_f * graph.data)
    return np.asarray(scores, dtype=np.float64) + weights @ np.asarray(scores, dtype=np.float64)


def reverse_message_selection(
    graph: sp.csr_matrix, scores: np.ndarray, m: int, gamma_r: float
) -> np.ndarray:
    """Step 2: m picks by reverse message passing, in the order picked.

    A lazy max-heap holds (−s', index, version); an entry whose version is not the sample's
    current one is stale and skipped, so each update is one push instead of a re-heapify.
    """
    check_budget(m, len(scores))
    current = np.asarray(scores, dtype=np.float64).tolist()
    indptr, indices = graph.indptr.tolist(), graph.indices.tolist()
    weights = np.exp(-gamma_r * graph.data).tolist()
    version = [0] * len(current)
    removed = bytearray(len(current))
    # Tuples compare by −s' first, then by index: equal scores pop lower index first.
    heap = [(-v, i, 0) for i, v in enumerate(current)]
    heapq.heapify(heap)
    picked: list[int] = []
    while len(picked) < m:
        _, i, ver = heapq.heappop(heap)
        if removed[i] or ver != version[i]:
            continue
        picked.append(i)
        removed[i] = 1
        s_i = current[i]
        for e in range(indptr[i], indptr[i + 1]):
            j = indices[e]
            if removed[j]:
                continue
            current[j] -= weights[e] * s_i
            version[j] += 1
            heapq.heappush(heap, (-current[j], j, version[j]))
    return np.asarray(picked, dtype=np.int64)


def d2_select(
    features: np.ndarray,
    scores: np.ndarray,
    m: int,
    *,
    k: int = 5,
    gamma_f: float = 1.0,
    gamma_r: float = 0.1,
) -> tuple[np.ndarray, dict[str, Any]]:
    """D2 on one global kNN graph: (indices in the order picked, info)."""
    scores = check_scores(scores)
    _check_d2_args(features, scores, m, k, gamma_f, gamma_r)
    picked, stats = _d2(features, scores, m, k, gamma_f, gamma_r)
    _warn_if_unnormalised(stats["median_neighbor_distance"], gamma_f)
    return picked, {**stats, "n_selected": len(picked)}


def d2_select_stratified(
    features: np.ndarray,
    scores: np.ndarray,
    m: int,
    *,
    strata: int,
    beta: float,
    k: int = 5,
    gamma_f: float = 1.0,
    gamma_r: float = 0.1,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The D2 paper's pipeline: cutoff, CCS strata and budgets, D2 within each stratum.

    Returns (indices, stratum by stratum in visiting order, each in the order picked; info with
    ``region_table``).
    """
    scores = check_scores(scores)
    _check_d2_args(features, scores, m, k, gamma_f, gamma_r)
    if strata < 1:
        raise ConfigError(f"--d2-strata must be >= 1 (or unset), got {strata}")
    x = _as_features(features)
    groups, n_cut = ccs_strata(scores, m, beta=beta, strata=strata)
    members = list(groups.values())
    budgets = stratum_budgets([len(g) for g in members], m)
    picks, medians = [], []
    for i in np.argsort([len(g) for g in members], kind="stable"):
        group, budget = members[i], int(budgets[i])
        local, stats = _d2(x[group], scores[group], budget, k, gamma_f, gamma_r)
        picks.append(group[local])
        medians.append(stats["median_neighbor_distance"])
    picked = np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)
    known = [d for d in medians if d is not None]
    median = float(np.median(known)) if known else None
    _warn_if_unnormalised(median, gamma_f)
    info: dict[str, Any] = {
        "k": int(k),
        "gamma_f": float(gamma_f),
        "gamma_r": float(gamma_r),
        "median_neighbor_distance": median,
        "beta": float(beta),
        "beta_effective": n_cut / len(scores) if len(scores) else 0.0,
        "n_cut": n_cut,
        "n_strata": len(groups),
        "n_selected": len(picked),
        "region_table": stratum_table(scores, groups, budgets, picked),
    }
    return picked, info


def _d2(
    x: np.ndarray, scores: np.ndarray, m: int, k: int, gamma_f: float, gamma_r: float
) -> tuple[np.ndarray, dict[str, Any]]:
    """Steps 1–2 on the kNN graph of ``x`` (already checked)."""
    if m == 0:
        empty = {"k": min(k, len(scores) - 1), "n_edges": 0, "median_neighbor_distance": None}
        return np.zeros(0, dtype=np.int64), empty
    graph = knn_graph(x, k)
    forward = forward_message_passing(graph, scores, gamma_f)
    picked = reverse_message_selection(graph, forward, m, gamma_r)
    stats = {
        "k": min(k, len(scores) - 1),
        "gamma_f": float(gamma_f),
        "gamma_r": float(gamma_r),
        "n_edges": graph.nnz // 2,
        "median_neighbor_distance": float(np.median(graph.data)) if graph.nnz else None,
    }
    return picked, stats


def _check_d2_args(
    features: np.ndarray, scores: np.ndarray, m: int, k: int, gamma_f: float, gamma_r: float
) -> None:
    shape = np.shape(features)
    if len(shape) != 2 or shape[0] != len(scores):
        raise ValueError(f"features must be (N = {len(scores)}, d), got shape {shape}")
    check_budget(m, len(scores))
    if k < 1:
        raise ConfigError(f"--d2-k must be >= 1, got {k}")
    if gamma_f < 0 or gamma_r < 0:
        raise ConfigError(
            f"--d2-gamma-f and --d2-gamma-r must be >= 0, got {gamma_f} and {gamma_r}"
        )


def _warn_if_unnormalised(median_distance: float | None, gamma_f: float) -> None:
    if median_distance is not None and gamma_f * median_distance > NEGLIGIBLE_EXPONENT:
        logger.warning(
            "D2: median neighbour distance %.3g makes exp(-gamma_f*d) ~ %.1e, so forward "
            "messages have no effect and D2 drifts to top-m by score; L2-normalise the "
            "features or lower --d2-gamma-f",
            median_distance,
            np.exp(-gamma_f * median_distance),
        )


def _as_features(features: np.ndarray) -> np.ndarray:
    """Float32 stays float32 (model embeddings: half the memory); anything else → float64."""
    x = np.asarray(features)
    return np.ascontiguousarray(x if x.dtype in (np.float32, np.float64) else x.astype(np.float64))


def _pair_distances(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """‖x_lo − x_hi‖₂ in float64, computed once per undirected edge, so d_ij = d_ji exactly."""
    out = np.empty(len(lo), dtype=np.float64)
    for s in range(0, len(lo), _PAIR_CHUNK):
        a = x[lo[s : s + _PAIR_CHUNK]].astype(np.float64)
        b = x[hi[s : s + _PAIR_CHUNK]].astype(np.float64)
        out[s : s + _PAIR_CHUNK] = np.linalg.norm(a - b, axis=1)
    return out


def _symmetric_csr(n: int, lo: np.ndarray, hi: np.ndarray, dist: np.ndarray) -> sp.csr_matrix:
    """CSR with (lo, hi) and (hi, lo) set to ``dist``, built from its arrays so that zero
    distances stay stored entries (scipy's arithmetic would drop them)."""
    rows = np.concatenate([lo, hi])
    cols = np.concatenate([hi, lo])
    order = np.lexsort((cols, rows))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
    data = np.concatenate([dist, dist])[order]
    return sp.csr_matrix((data, cols[order], indptr), shape=(n, n))


@dataclass
class D2Settings(MethodSettings):
    """D2's graph (k neighbours), its message weights, and the optional CCS strata."""

    d2_k: int = field(default=5, metadata={"help": "D2 nearest neighbours"})
    d2_gamma_f: float = field(default=1.0, metadata={"help": "D2 forward message gamma"})
    d2_gamma_r: float = field(default=0.1, metadata={"help": "D2 reverse message gamma"})
    d2_strata: int | None = field(
        default=None, metadata={"help": "run D2 within CCS strata (the D2 paper's pipeline)"}
    )
    ccs_beta: float = field(
        default=0.1,
        metadata={"help": "CCS hard-cutoff rate beta (0: no cutoff, as in the STAFF paper's CCS)"},
    )

    def validate(self) -> None:
        super().validate()
        if self.d2_k < 1:
            raise ConfigError(f"--d2-k must be >= 1, got {self.d2_k}")
        if self.d2_strata is not None and self.d2_strata < 1:
            raise ConfigError(f"--d2-strata must be >= 1, got {self.d2_strata}")
        if not 0 <= self.ccs_beta < 1:
            raise ConfigError(f"--ccs-beta must be in [0, 1), got {self.ccs_beta}")


@register_method
class D2(SelectionMethod):
    """D2 Pruning over EL2N and the tuned target's embeddings."""

    name = "d2"
    description = "D2 pruning: kNN-graph message passing over EL2N and target embeddings"
    settings_class = D2Settings
    needs = ("target",)

    def requests(self, config: RunConfig, n: int) -> list[ModelWork]:
        return [tuned_target("el2n"), tuned_target("embedding")]

    def select(self, provider: ScoreProvider, budget: int, seed: int) -> Selection:
        cfg = self.settings(provider.config)
        with provider.stage(TARGET_STAGE):
            scores = check_scores(provider.get(tuned_target("el2n")))
            features = provider.get(tuned_target("embedding"))
        k, gamma_f, gamma_r = cfg.d2_k, cfg.d2_gamma_f, cfg.d2_gamma_r
        with provider.stage("selection"):
            if cfg.d2_strata is None:
                indices, info = d2_select(
                    features, scores, budget, k=k, gamma_f=gamma_f, gamma_r=gamma_r
                )
            else:
                indices, info = d2_select_stratified(
                    features,
                    scores,
                    budget,
                    strata=cfg.d2_strata,
                    beta=cfg.ccs_beta,
                    k=k,
                    gamma_f=gamma_f,
                    gamma_r=gamma_r,
                )
        logger.info("d2: kept %d of %d (k = %s)", len(indices), provider.n, info["k"])
        table = info.pop("region_table", [])
        return Selection(
            method=self.name,
            indices=indices,
            n_total=provider.n,
            budget=budget,
            scores=scores,
            region_table=table,
            info={"score": "el2n", "target_tuned": True, "strata": cfg.d2_strata, **info},
        )
