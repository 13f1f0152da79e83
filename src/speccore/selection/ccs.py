"""CCS: Coverage-centric Coreset Selection (Zheng et al., "Coverage-centric Coreset Selection for
High Pruning Rates", ICLR 2023), Algorithm 1, with EL2N on the fully tuned target as importance.

Given N samples with importance scores s, budget m = ⌊N·(1−p)⌋, cutoff rate β and K strata:

1. Hard cutoff: drop the ⌊β'·N⌋ highest-scoring samples (the hardest are often mislabeled or
   unlearnable), with β' = min(β, 1 − m/N) so that m samples are left to choose from. The CCS
   paper tunes β per pruning rate and uses larger values (up to 0.4) at high rates; here β is a
   setting (``ccs_beta``, default 0.1) and is only ever lowered. Ties: lower index cut first.
2. Split the remaining scores into K strata of equal width over [min, max] (the last stratum
   holds max; empty strata are dropped; all scores equal → one stratum).
3. Budget loop: visit the strata smallest first (ties: lower stratum id); stratum S_i gets
   m_i = min(|S_i|, ⌊r / L⌋) samples drawn uniformly at random, r the budget not yet spent and L
   the strata not yet visited; r ← r − m_i.

The loop never loses budget to the floors: visiting the smallest strata first, whenever m_i is cut
by ⌊r/L⌋ every later stratum holds more than ⌊r/L⌋ samples, so the L−1 strata left hold at least
(L−1)(⌊r/L⌋+1) ≥ r − ⌊r/L⌋ samples and the last stratum takes whatever remains. Hence it selects
exactly min(m, Σ|S_i|) = m samples after the cutoff above. ``n_selected`` is reported anyway.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from ..utils.errors import ConfigError
from .base import (
    MethodSettings,
    ModelWork,
    RunConfig,
    ScoreProvider,
    Selection,
    SelectionMethod,
    register_method,
    rng_for,
)
from .regions import equal_width_regions, region_members
from .score_based import TARGET_STAGE, check_budget, check_scores, tuned_target

logger = logging.getLogger(__name__)

CCS_SALT = "ccs"


def equal_width_strata(scores: np.ndarray, k: int) -> np.ndarray:
    """Stratum id (0..k-1) of every score: k bins of equal width over [min, max], max in the
    last bin, all-equal scores in bin 0 (:func:`~speccore.selection.regions.equal_width_regions`)."""
    if k < 1:
        raise ConfigError(f"number of strata/regions must be >= 1, got {k}")
    return equal_width_regions(scores, k)


def effective_cutoff(n: int, m: int, beta: float) -> int:
    """⌊β'·N⌋ with β' = min(β, 1 − m/N), computed exactly (β read as the decimal the user typed)."""
    if not 0 <= beta < 1:
        raise ConfigError(f"--ccs-beta must be in [0, 1), got {beta}")
    check_budget(m, n)
    # Fraction(repr(0.29)) is 29/100: in floating point 0.29·100 floors to 28.
    return min(math.floor(Fraction(repr(float(beta))) * n), n - m)


def hard_cutoff(scores: np.ndarray, m: int, beta: float) -> tuple[np.ndarray, int]:
    """The pool left after dropping the ⌊β'·N⌋ highest scores (sorted indices), and that count."""
    n_cut = effective_cutoff(len(scores), m, beta)
    return np.flatnonzero(~top_mask(scores, n_cut)), n_cut


def top_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Mask of the k highest scores (ties: lower index first, as :func:`rank_descending`).

    A partition instead of a sort keeps the cutoff O(N): at 10⁶ samples the sort dominated CCS.
    """
    mask = np.zeros(len(scores), dtype=bool)
    if k <= 0:
        return mask
    threshold = np.partition(scores, len(scores) - k)[len(scores) - k]
    mask[scores > threshold] = True
    ties = np.flatnonzero(scores == threshold)
    mask[ties[: k - int(mask.sum())]] = True
    return mask


def ccs_strata(
    scores: np.ndarray, m: int, *, beta: float, strata: int
) -> tuple[dict[int, np.ndarray], int]:
    """Steps 1–2: non-empty strata of the pool after the cutoff, as {stratum id: sample indices}
    (ids 0..K-1 over the pool's score range, indices ascending), and the number cut."""
    pool, n_cut = hard_cutoff(scores, m, beta)
    ids = equal_width_strata(scores[pool], strata)
    return {r: pool[pos] for r, pos in region_members(ids).items()}, n_cut


def stratum_budgets(sizes: Sequence[int], m: int) -> np.ndarray:
    """Step 3's budgets m_i, in the order of ``sizes`` (see the module docstring)."""
    sizes_arr = np.asarray(sizes, dtype=np.int64)
    budgets = np.zeros(len(sizes_arr), dtype=np.int64)
    remaining = int(m)
    visit = np.argsort(sizes_arr, kind="stable")
    for left, i in zip(range(len(visit), 0, -1), visit, strict=True):
        budgets[i] = min(int(sizes_arr[i]), remaining // left)
        remaining -= int(budgets[i])
    return budgets


def stratified_budget_loop(
    strata: list[np.ndarray], m: int, rng: np.random.Generator
) -> np.ndarray:
    """Step 3: m_i samples uniformly at random from each stratum (sorted indices).

    Empty strata are ignored, as if dropped. Strata are drawn from in visiting order (smallest
    first), so the same ``rng`` state gives the same coreset.
    """
    strata = [np.asarray(s, dtype=np.int64) for s in strata if len(s)]
    check_budget(m, sum(len(s) for s in strata))
    budgets = stratum_budgets([len(s) for s in strata], m)
    visit = np.argsort([len(s) for s in strata], kind="stable")
    picks = [rng.choice(strata[i], size=int(budgets[i]), replace=False) for i in visit]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, dtype=np.int64)


def stratum_table(
    scores: np.ndarray, strata: dict[int, np.ndarray], budgets: np.ndarray, kept: np.ndarray
) -> list[dict[str, Any]]:
    """One row per non-empty stratum: its id, score range, size, budget and samples taken."""
    keep = np.zeros(len(scores), dtype=bool)
    keep[kept] = True
    return [
        {
            "region": r,
            "score_lo": float(scores[members].min()),
            "score_hi": float(scores[members].max()),
            "size": len(members),
            "budget": int(b),
            "taken": int(keep[members].sum()),
        }
        for (r, members), b in zip(strata.items(), budgets, strict=True)
    ]


def ccs_select(
    scores: np.ndarray, m: int, *, beta: float, strata: int, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, Any]]:
    """CCS over precomputed importance scores: (sorted indices, info).

    ``info`` holds the cutoff (``n_cut`` samples, ``beta_effective`` = n_cut/N), ``n_strata``,
    ``n_selected`` and a ``region_table`` (one row per non-empty stratum).
    """
    scores = check_scores(scores)
    groups, n_cut = ccs_strata(scores, m, beta=beta, strata=strata)
    members = list(groups.values())
    indices = stratified_budget_loop(members, m, rng)
    budgets = stratum_budgets([len(s) for s in members], m)
    n = len(scores)
    info: dict[str, Any] = {
        "beta": float(beta),
        "beta_effective": n_cut / n if n else 0.0,
        "n_cut": n_cut,
        "n_strata": len(groups),
        "n_selected": len(indices),
        "region_table": stratum_table(scores, groups, budgets, indices),
    }
    return indices, info


@dataclass
class CcsSettings(MethodSettings):
    """CCS's cutoff rate β and its K strata."""

    ccs_beta: float = field(
        default=0.1,
        metadata={"help": "CCS hard-cutoff rate beta (0: no cutoff, as in the STAFF paper's CCS)"},
    )
    regions: int = field(default=50, metadata={"help": "K, regions (strata) of equal score width"})

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.ccs_beta < 1:
            raise ConfigError(f"--ccs-beta must be in [0, 1), got {self.ccs_beta}")
        if self.regions < 1:
            raise ConfigError(f"--regions (K) must be >= 1, got {self.regions}")


@register_method
class CCS(SelectionMethod):
    """Coverage-centric coreset selection over EL2N on the fully tuned target."""

    name = "ccs"
    description = "coverage-centric selection: hard cutoff + stratified sampling over EL2N"
    random_draws = True
    settings_class = CcsSettings
    needs = ("target",)

    def requests(self, config: RunConfig, n: int) -> list[ModelWork]:
        return [tuned_target("el2n")]

    def select(self, provider: ScoreProvider, budget: int, seed: int) -> Selection:
        cfg = self.settings(provider.config)
        with provider.stage(TARGET_STAGE):
            scores = check_scores(provider.get(tuned_target("el2n")))
        with provider.stage("selection"):
            indices, info = ccs_select(
                scores,
                budget,
                beta=cfg.ccs_beta,
                strata=cfg.regions,
                rng=rng_for(seed, CCS_SALT),
            )
        logger.info(
            "ccs: cut the %d hardest, %d strata, kept %d of %d",
            info["n_cut"],
            info["n_strata"],
            info["n_selected"],
            provider.n,
        )
        table = info.pop("region_table")
        return Selection(
            method=self.name,
            indices=indices,
            n_total=provider.n,
            budget=budget,
            scores=scores,
            region_table=table,
            info={"score": "el2n", "target_tuned": True, **info},
        )
