"""Random baseline: m = ⌊N·(1−p)⌋ samples drawn uniformly without replacement.

The reference point of every coreset paper (e.g. Zheng et al., ICLR 2023, and the STAFF paper's
Table 1): at high pruning rates it is hard to beat because it keeps the data's distribution.
Needs no model at all.
"""

from __future__ import annotations

import logging

import numpy as np

from .base import (
    ModelWork,
    RunConfig,
    ScoreProvider,
    Selection,
    SelectionMethod,
    register_method,
    rng_for,
)
from .score_based import check_budget

logger = logging.getLogger(__name__)

RANDOM_SALT = "random"


def random_select(n: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """m distinct indices out of range(n), uniformly at random (sorted)."""
    check_budget(m, n)
    return np.sort(rng.choice(n, size=m, replace=False))


@register_method
class Random(SelectionMethod):
    """m samples uniformly at random (seeded)."""

    name = "random"
    description = "m samples uniformly at random"
    random_draws = True

    def requests(self, config: RunConfig, n: int) -> list[ModelWork]:
        return []

    def select(self, provider: ScoreProvider, budget: int, seed: int) -> Selection:
        with provider.stage("selection"):
            indices = random_select(provider.n, budget, rng_for(seed, RANDOM_SALT))
        logger.info("random: kept %d of %d samples", len(indices), provider.n)
        return Selection(
            method=self.name, indices=indices, n_total=provider.n, budget=budget, info={}
        )
