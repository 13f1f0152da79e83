"""Score-based baselines: keep the m samples the fully fine-tuned target finds hardest.

Both scores come from the target model LoRA-fine-tuned on the full data (the expensive step that
STAFF avoids); the coreset is the m = ⌊N·(1−p)⌋ samples with the highest score.

* GraNd (Paul et al., "Deep Learning on a Data Diet", NeurIPS 2021): the gradient norm of the
  loss, here ‖∇_φ L(θ_t(d))‖₂ over the LoRA parameters φ, i.e. the "effort" score.
* EL2N (same paper): the L2 norm of the error vector, ‖softmax(f(x)) − onehot(y)‖₂ (for an LLM
  per response token, aggregated over the response by :mod:`speccore.scoring`).

Ties are broken by the lower sample index, so the selection is a pure function of the scores.
"""

from __future__ import annotations

import logging

import numpy as np

from ..utils.errors import ScoringError
from .base import ModelWork, RunConfig, ScoreProvider, Selection, SelectionMethod, register_method

logger = logging.getLogger(__name__)

TARGET_STAGE = "target setup"


def check_budget(m: int, n: int) -> None:
    """Raise unless 0 ≤ m ≤ n (a selection cannot hold more samples than the data)."""
    if not 0 <= m <= n:
        raise ValueError(f"budget m = {m} must be in [0, N = {n}]")


def check_scores(scores: np.ndarray) -> np.ndarray:
    """The scores as a 1-D float64 array; a NaN or infinite score names its sample."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {scores.shape}")
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        raise ScoringError(
            f"score of sample {int(bad[0])} is {scores[bad[0]]} ({len(bad)} non-finite in all); "
            "rescore the data or lower the learning rate if the loss diverged"
        )
    return scores


def tuned_target(output: str) -> ModelWork:
    """The baselines' model work: ``output`` of every sample on the target fine-tuned on all
    data (the expensive step STAFF avoids)."""
    stage = "target embeddings" if output == "embedding" else "target scoring"
    return ModelWork("target", output, tuned=True, stage=stage)


def rank_descending(scores: np.ndarray) -> np.ndarray:
    """Sample indices from the highest score to the lowest; ties: lower index first."""
    # A stable sort of −score keeps equal scores in index order.
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def top_m(scores: np.ndarray, m: int) -> np.ndarray:
    """Indices of the m highest scores (ties: lower index first), highest first."""
    scores = check_scores(scores)
    check_budget(m, len(scores))
    return rank_descending(scores)[:m]


class _TopByTargetScore(SelectionMethod):
    """Keep the ``budget`` highest ``score`` values on the target tuned on the full data."""

    score: str
    needs = ("target",)

    def requests(self, config: RunConfig, n: int) -> list[ModelWork]:
        return [tuned_target(self.score)]

    def select(self, provider: ScoreProvider, budget: int, seed: int) -> Selection:
        with provider.stage(TARGET_STAGE):
            scores = check_scores(provider.get(tuned_target(self.score)))
        with provider.stage("selection"):
            indices = top_m(scores, budget)
        threshold = float(scores[indices[-1]]) if len(indices) else None
        logger.info("%s: kept the %d highest of %d scores", self.name, len(indices), provider.n)
        return Selection(
            method=self.name,
            indices=indices,
            n_total=provider.n,
            budget=budget,
            scores=scores,
            info={"score": self.score, "target_tuned": True, "lowest_kept_score": threshold},
        )


@register_method
class GraNd(_TopByTargetScore):
    """GraNd: the m largest loss-gradient norms (effort) on the fully tuned target."""

    name = "grand"
    description = "top-m gradient norm (effort) on the target fine-tuned on all data"
    score = "effort"


@register_method
class EL2N(_TopByTargetScore):
    """EL2N: the m largest error-vector norms on the fully tuned target."""

    name = "el2n"
    description = "top-m EL2N on the target fine-tuned on all data"
    score = "el2n"
