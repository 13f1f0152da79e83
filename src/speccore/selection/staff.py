"""STAFF: speculative coreset selection (Zhang et al., "Speculative Coreset Selection for
Task-Specific Fine-tuning", ICLR 2025), Algorithm 1.

Inputs: data D of N samples, small model θ_s, target θ_t, pruning rate p, fine-tuning budget T,
regions K, verification budget b_v.

1. Fine-tune θ_s with LoRA on D for T epochs (the pipeline does this; here we get its scores).
2. Speculative score S^s_d of every sample on θ_s (effort: ‖∇_φ L(θ_s(d))‖₂ over the LoRA φ).
3. Split D into K regions of equal score width over [min, max]; drop empty regions.
4. m = ⌊N·(1−p)⌋. Regions are visited smallest first (ties: lower score range first). For region
   B_i draw min(b_v, |B_i|) samples at random, score them on the *untuned* target (S^t) and set
   V_i = Σ S^t / Σ S^s over them, on raw scores (min-max normalised scores put the lowest sample
   at 0 and can divide by zero). Its budget is m_B = ⌊(m − |D'|)·V_i / |B|⌋, |B| the regions
   not yet visited; take min(m_B, |B_i|) samples of B_i at random.

Choices this module makes where the paper is silent, and why:

* Scale. Raw target and small efforts live on different scales (another model, another number of
  LoRA parameters), so a raw V_i of, say, 40 would hand the first region the whole budget. We
  verify every region first and normalise V to mean 1 over regions: V_i then says how much more
  (or less) than average the target still has to learn in region i, which is the paper's intent.
  The target cost is the same (the same samples are verified either way).
* Never over budget. With V_i > 1, m_B can exceed what is left; a region takes at most m − |D'|.
* Exact size. The loop can end under m (floors, small regions). By default the coreset is topped
  up to exactly m from unselected samples, regions with the largest V_i first, at random within a
  region, and the number topped up is recorded; ``fill=False`` keeps the paper's "≤ m".

``allocation="reference"`` reproduces the authors' public code instead, which differs from the
paper: it first removes the top 10% of small-model scores (at most ⌊p·N⌋ of them, so m stays
reachable when p < 0.1), gives region i the budget ⌊m_remaining·V_i / Σ V_remaining⌋, and takes
the highest-scoring samples of a region rather than random ones.

The target model is never fine-tuned here and sees only the verified samples (≤ K·b_v): that is
where STAFF's time saving comes from.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from .base import ScoreProvider, Selection, SelectionMethod, register_method, rng_for
from .regions import equal_width_regions, region_members

logger = logging.getLogger(__name__)

AGREEMENT_WARN_BELOW = 0.3
REFERENCE_CUT = Fraction(1, 10)

VerifyFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class Region:
    """One region B_i and what the algorithm did with it."""

    id: int
    members: np.ndarray
    lo: float
    hi: float
    verified: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    ratio: float = 1.0  # raw Σ S^t / Σ S^s over the verified samples
    v: float = 1.0  # V_i after normalisation
    budget: int = 0
    taken: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    filled: int = 0

    def row(self) -> dict[str, Any]:
        return {
            "region": self.id,
            "score_lo": self.lo,
            "score_hi": self.hi,
            "size": len(self.members),
            "verified": len(self.verified),
            "ratio": self.ratio,
            "V": self.v,
            "budget": self.budget,
            "taken": len(self.taken),
            "filled": self.filled,
        }


def staff_select(
    scores: np.ndarray,
    m: int,
    *,
    regions: int = 50,
    verify_per_region: int = 10,
    verify: VerifyFn | None,
    seed: int = 0,
    allocation: str = "paper",
    fill: bool = True,
    prune_rate: float | None = None,
) -> Selection:
    """Algorithm 1 over precomputed speculative scores.

    ``verify(indices)`` returns the target's scores of those samples; ``None`` is the paper's
    no-verification ablation (every V_i = 1). ``prune_rate`` is only needed for the reference
    allocation's cut (default: 1 − m/N).
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    if not 1 <= m <= n:
        raise ValueError(f"budget m = {m} must be in [1, N = {n}]")
    rng = rng_for(seed, 0x57AFF)
    pool, cut = _reference_cut(scores, m, prune_rate) if allocation == "reference" else (None, 0)
    blocks = split_regions(scores, regions, pool)
    agreement = verify_regions(blocks, scores, verify, verify_per_region, rng)
    if allocation == "reference":
        selected = allocate_reference(blocks, scores, m)
    else:
        selected = allocate_paper(blocks, m, rng)
    n_filled = (
        fill_to_budget(blocks, scores, m, rng, by_score=allocation == "reference") if fill else 0
    )
    region_of = np.full(n, -1, dtype=np.int64)
    for b in blocks:
        region_of[b.members] = b.id
    indices = np.concatenate([b.taken for b in blocks]) if blocks else np.zeros(0, np.int64)
    assert len(indices) == selected + n_filled
    return Selection(
        method="staff",
        indices=indices,
        n_total=n,
        budget=m,
        scores=scores,
        regions=region_of,
        region_table=[b.row() for b in blocks],
        info={
            "allocation": allocation,
            "verification": verify is not None,
            "n_regions": len(blocks),
            "n_verified": int(sum(len(b.verified) for b in blocks)),
            "n_filled": n_filled,
            "n_reference_cut": cut,
            "agreement": agreement,
        },
    )


def split_regions(scores: np.ndarray, k: int, pool: np.ndarray | None = None) -> list[Region]:
    """Step 3: K equal-width regions over the pool's scores, empty ones dropped, in visiting
    order: smallest first, ties broken by the lower score range."""
    pool = np.arange(len(scores)) if pool is None else pool
    ids = equal_width_regions(scores[pool], k)
    blocks = [
        Region(
            id=r,
            members=pool[idx],
            lo=float(scores[pool[idx]].min()),
            hi=float(scores[pool[idx]].max()),
        )
        for r, idx in region_members(ids).items()
    ]
    return sorted(blocks, key=lambda b: (len(b.members), b.id))


def verify_regions(
    blocks: list[Region],
    scores: np.ndarray,
    verify: VerifyFn | None,
    per_region: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Step 4's verification, done for every region up front so V can be normalised (step 5).

    The target is called once, on the ≤ K·b_v drawn samples only. Returns the agreement of
    small and target scores over the verified samples, with both scores of every verified sample
    (``indices``, ``small``, ``target``: the bench plots them).
    """
    if verify is None:
        return {"spearman": None, "n": 0, "indices": [], "small": [], "target": []}
    for b in blocks:
        b.verified = np.sort(
            rng.choice(b.members, size=min(per_region, len(b.members)), replace=False)
        )
    drawn = np.concatenate([b.verified for b in blocks])
    target = np.asarray(verify(drawn), dtype=np.float64)
    if target.shape != drawn.shape:
        raise ValueError(f"verifier returned {target.shape} scores for {drawn.shape} samples")
    target_of = dict(zip(drawn.tolist(), target.tolist(), strict=True))
    for b in blocks:
        small_sum = float(scores[b.verified].sum())
        target_sum = sum(target_of[i] for i in b.verified.tolist())
        # A region whose small scores are all zero carries no ratio; treat it as average.
        b.ratio = target_sum / small_sum if small_sum > 0 else math.nan
    ratios = np.array([b.ratio for b in blocks])
    mean = float(np.nanmean(ratios)) if np.isfinite(ratios).any() else math.nan
    for b in blocks:
        b.v = b.ratio / mean if math.isfinite(b.ratio) and mean > 0 else 1.0
    return {
        **agreement(scores[drawn], target),
        "indices": drawn.tolist(),
        "small": scores[drawn].tolist(),
        "target": target.tolist(),
    }


def agreement(small: np.ndarray, target: np.ndarray) -> dict[str, Any]:
    """Spearman correlation of small vs target scores; warns when it is too low to trust."""
    from scipy.stats import spearmanr

    if len(small) < 3 or np.ptp(small) == 0 or np.ptp(target) == 0:
        return {"spearman": None, "n": len(small)}
    rho = float(spearmanr(small, target).statistic)
    if rho < AGREEMENT_WARN_BELOW:
        logger.warning(
            "small/target score agreement is low (Spearman %.2f over %d verified samples): the "
            "small model's scores hardly predict the target's; try a smaller model of the "
            "target's own family, or another --score (loss agrees better across families)",
            rho,
            len(small),
        )
    return {"spearman": rho, "n": len(small)}


def allocate_paper(blocks: list[Region], m: int, rng: np.random.Generator) -> int:
    """Step 4's budgets: m_B = ⌊(m − |D'|)·V_i / |B|⌋, random samples within the region."""
    selected = 0
    for visited, b in enumerate(blocks):
        left = len(blocks) - visited
        b.budget = max(0, math.floor((m - selected) * b.v / left))
        take = min(b.budget, len(b.members), m - selected)
        b.taken = np.sort(rng.choice(b.members, size=take, replace=False))
        selected += take
    return selected


def allocate_reference(blocks: list[Region], scores: np.ndarray, m: int) -> int:
    """The authors' code: ⌊m_remaining·V_i / Σ V_remaining⌋, highest scores within a region."""
    selected = 0
    v_left = float(sum(b.v for b in blocks))
    for b in blocks:
        b.budget = max(0, math.floor((m - selected) * b.v / v_left)) if v_left > 0 else 0
        take = min(b.budget, len(b.members), m - selected)
        b.taken = np.sort(_highest(b.members, scores, take))
        selected += take
        v_left -= b.v
    return selected


def fill_to_budget(
    blocks: list[Region], scores: np.ndarray, m: int, rng: np.random.Generator, by_score: bool
) -> int:
    """Step 6: top up to exactly m, regions with the largest V_i first (ties: visiting order)."""
    missing = m - sum(len(b.taken) for b in blocks)
    for b in sorted(blocks, key=lambda b: -b.v):
        if missing <= 0:
            break
        rest = np.setdiff1d(b.members, b.taken)
        extra = min(missing, len(rest))
        picked = (
            _highest(rest, scores, extra)
            if by_score
            else rng.choice(rest, size=extra, replace=False)
        )
        b.taken = np.sort(np.concatenate([b.taken, picked]))
        b.filled = extra
        missing -= extra
    return sum(b.filled for b in blocks)


def _highest(members: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """The k highest-scoring members (ties: lower index first)."""
    order = np.lexsort((members, -scores[members]))
    return members[order[:k]]


def _reference_cut(scores: np.ndarray, m: int, prune_rate: float | None) -> tuple[np.ndarray, int]:
    """Drop the top 10% of small-model scores, at most ⌊p·N⌋ so that m stays reachable."""
    n = len(scores)
    p = Fraction(repr(float(prune_rate))) if prune_rate is not None else Fraction(n - m, n)
    cut = min(math.floor(REFERENCE_CUT * n), math.floor(p * n), n - m)
    order = np.lexsort((np.arange(n), -scores))
    return np.sort(order[cut:]), cut


@register_method
class Staff(SelectionMethod):
    """STAFF (and its no-verification ablation with ``verification=False``)."""

    name = "staff"
    description = "speculative coreset selection: small-model effort, target verification"
    verification = True

    def select(self, provider: ScoreProvider, budget: int, seed: int) -> Selection:
        cfg = provider.config
        with provider.stage("small setup"):
            scores = provider.small_scores()
        verify: VerifyFn | None = None
        if cfg.verification and self.verification:
            verifier = provider.verifier()

            def verify(indices: np.ndarray) -> np.ndarray:
                with provider.stage("target verification"):
                    return verifier(indices)

        return staff_select(
            scores,
            budget,
            regions=cfg.regions,
            verify_per_region=cfg.verify_per_region,
            verify=verify,
            seed=seed,
            allocation=cfg.allocation,
            fill=cfg.fill,
            prune_rate=cfg.prune_rate,
        )


@register_method
class StaffNoVerification(Staff):
    """STAFF's no-verification ablation (every V_i = 1) under a name of its own, so that a bench
    can put it beside STAFF in one grid (``--no-verification`` is a setting of every cell)."""

    name = "staff-no-verification"
    description = "STAFF ablation without target verification: every V_i = 1, no target call"
    verification = False
