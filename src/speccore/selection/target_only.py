"""STAFF without the small model (Zhang et al., ICLR 2025, Table 3 ablation "target only").

Every sample is scored on the *untuned* target (a fresh LoRA, same score function as STAFF,
``config.score``); the scores are split into K regions of equal width over [min, max] (empty
regions dropped) and the budget m = ⌊N·(1−p)⌋ is spread over the regions with CCS's loop, smallest
region first: m_i = min(|B_i|, ⌊r / L⌋), r the budget left and L the regions left, m_i samples
drawn uniformly at random within the region. Unlike CCS there is no hard cutoff.

It shows what STAFF's speculative scores buy: the same region allocation, but the target has to
score all N samples instead of verifying K·b_v of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..utils.errors import ConfigError
from .base import (
    MethodSettings,
    ModelWork,
    RunConfig,
    Score,
    ScoreProvider,
    Selection,
    SelectionMethod,
    register_method,
    rng_for,
)
from .ccs import equal_width_strata, stratified_budget_loop, stratum_budgets, stratum_table
from .regions import region_members
from .score_based import check_scores

logger = logging.getLogger(__name__)

TARGET_ONLY_SALT = "staff-target-only"


@dataclass
class TargetOnlySettings(MethodSettings):
    """The score and K of the target-only ablation (declared as STAFF declares them)."""

    score: Score = field(
        default="effort", metadata={"help": "score of both the speculative and verification stage"}
    )
    regions: int = field(default=50, metadata={"help": "K, regions (strata) of equal score width"})

    def validate(self) -> None:
        super().validate()
        if self.regions < 1:
            raise ConfigError(f"--regions (K) must be >= 1, got {self.regions}")


@register_method
class StaffTargetOnly(SelectionMethod):
    """Regions over the untuned target's scores of all samples, CCS budget loop, no cutoff."""

    name = "staff-target-only"
    description = "STAFF ablation without a small model: regions over untuned-target scores"
    random_draws = True
    settings_class = TargetOnlySettings
    needs = ("target",)

    def requests(self, config: RunConfig, n: int) -> list[ModelWork]:
        return [ModelWork("target", self.settings(config).score)]

    def select(self, provider: ScoreProvider, budget: int, seed: int) -> Selection:
        cfg = self.settings(provider.config)
        with provider.stage("target setup"):
            scores = check_scores(provider.get(ModelWork("target", cfg.score)))
        with provider.stage("selection"):
            region_of = equal_width_strata(scores, cfg.regions)
            groups = region_members(region_of)
            members = list(groups.values())
            indices = stratified_budget_loop(members, budget, rng_for(seed, TARGET_ONLY_SALT))
        budgets = stratum_budgets([len(s) for s in members], budget)
        logger.info(
            "staff-target-only: %d regions over untuned-target %s, kept %d of %d",
            len(groups),
            cfg.score,
            len(indices),
            provider.n,
        )
        return Selection(
            method=self.name,
            indices=indices,
            n_total=provider.n,
            budget=budget,
            scores=scores,
            regions=region_of,
            region_table=stratum_table(scores, groups, budgets, indices),
            info={
                "score": cfg.score,
                "target_tuned": False,
                "n_regions": len(groups),
                "n_selected": len(indices),
            },
        )
