"""Perplexity bands: keep the samples whose perplexity under a small reference model lies in one
band (Ankner et al., "Perplexed by Perplexity: Perplexity-Based Data Pruning With Small
Reference Models", 2024; Marion et al., "When Less is More: Investigating Data Pruning for
Pretraining LLMs at Scale", 2023).

1. Perplexity of every sample under the small model: PPL(d) = exp(mean NLL of d's response
   tokens), the exponential of speccore's "loss" score. By default the model is the pretrained
   small model (``--perplexity-model untuned``), the reference model of both papers;
   ``tuned`` uses the small model after STAFF's fine-tune (the same cached adapter).
2. Order the samples by perplexity, ascending; equal perplexities in index order. This one total
   order serves every band.
3. Keep m = ⌊N·(1−p)⌋ consecutive samples of that order (``--band``): ``low`` the first m,
   ``high`` the last m, ``middle`` (default; both papers find it a strong choice) the m in the
   centre: it starts after ⌊(N−m)/2⌋ samples, so with an odd number N−m of samples left out the
   extra one is left out at the high-perplexity end.

Choices this module makes where the papers are silent (they prune pretraining text):

* Only the response is scored: prompts are given at fine-tuning time, not learned, so their
  perplexity says nothing about what a sample teaches. This is the mean loss every method in
  speccore uses (the loss STAFF's small model is trained on).
* The order is computed on the loss, not on its exponential: exp is increasing, so the bands
  are the same, and equal losses cannot be told apart by rounding after exp.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .base import (
    MethodSettings,
    ModelWork,
    RunConfig,
    ScoreProvider,
    Selection,
    SelectionMethod,
    register_method,
)
from .score_based import check_budget, check_scores

logger = logging.getLogger(__name__)

Band = Literal["low", "middle", "high"]


def band_start(n: int, m: int, band: Band) -> int:
    """Where a band of m starts in the ascending order of n samples (middle: ⌊(n−m)/2⌋)."""
    check_budget(m, n)
    starts = {"low": 0, "middle": (n - m) // 2, "high": n - m}
    return starts[band]


def band_indices(values: np.ndarray, m: int, band: Band) -> np.ndarray:
    """Sorted indices of the m samples in ``band`` of ``values`` (ascending, ties in index
    order): the first, central or last m of that order."""
    values = check_scores(values)
    order = np.argsort(values, kind="stable")
    start = band_start(len(values), m, band)
    return np.sort(order[start : start + m])


@dataclass
class PerplexitySettings(MethodSettings):
    """The reference model and the band kept."""

    perplexity_model: Literal["tuned", "untuned"] = field(
        default="untuned",
        metadata={"help": "reference model: the pretrained small model or STAFF's tuned one"},
    )
    band: Band = field(default="middle", metadata={"help": "perplexity band to keep"})


@register_method
class Perplexity(SelectionMethod):
    """Keep the low, middle or high perplexity band under the small model."""

    name = "perplexity"
    description = "keep a band (low, middle, high) of response perplexity under the small model"
    settings_class = PerplexitySettings
    needs = ("small",)

    def requests(self, config: RunConfig, n: int) -> list[ModelWork]:
        tuned = self.settings(config).perplexity_model == "tuned"
        return [ModelWork("small", "loss", tuned=tuned)]

    def select(self, provider: ScoreProvider, budget: int, seed: int) -> Selection:
        settings: PerplexitySettings = self.settings(provider.config)
        with provider.stage("small setup"):
            loss = check_scores(provider.get(self.requests(provider.config, provider.n)[0]))
        with provider.stage("selection"):
            indices = band_indices(loss, budget, settings.band)
            start = band_start(provider.n, budget, settings.band)
        ppl = np.exp(loss)
        kept = ppl[indices]
        logger.info(
            "perplexity: kept the %s band (%d of %d) under the %s small model",
            settings.band,
            len(indices),
            provider.n,
            settings.perplexity_model,
        )
        return Selection(
            method=self.name,
            indices=indices,
            n_total=provider.n,
            budget=budget,
            scores=ppl,
            info={
                "score": "perplexity",
                "perplexity_model": settings.perplexity_model,
                "band": settings.band,
                "n_left_out_low": start,
                "n_left_out_high": provider.n - budget - start,
                "band_min": float(kept.min()) if len(kept) else None,
                "band_max": float(kept.max()) if len(kept) else None,
            },
        )
