"""STAFF: speculative coreset selection (Zhang et al., "Speculative Coreset Selection for
Task-Specific Fine-tuning", ICLR 2025), Algorithm 1.

Inputs: data D of N samples, small model θ_s, target θ_t, pruning rate p, fine-tuning budget T,
regions K, verification budget b_v. The steps are numbered as the lines of Algorithm 1; the code
below cites them as "line n".

Stage 1, speculative scores (the pipeline runs these; :func:`staff_select` receives S^s):

1. θ_s ← fine-tune θ_s with LoRA on D for T epochs.
2. S^s_d ← ‖∇_φ L(θ_s(d))‖₂ for every d in D (the effort score over the LoRA parameters φ).

Stage 2, verification and selection (:func:`staff_select`):

3. 𝔹 ← split D into K regions of equal score width over [min S^s, max S^s]; empty ones dropped.
4. D' ← ∅; m ← ⌊N·(1−p)⌋.
5. while 𝔹 is not empty:
6.   B_i ← the region of 𝔹 with the fewest samples (ties: the lower score range first).
7.   B*_i ← min(b_v, |B_i|) samples of B_i drawn at random; score them on the untuned target.
8.   V_i ← Σ_{d∈B*_i} S^t_d / Σ_{d∈B*_i} S^s_d, on raw scores (min-max normalised scores put
     the lowest sample at 0 and can divide by zero).
9.   m_B ← ⌊(m − |D'|)·V_i / |𝔹|⌋, |𝔹| the regions not yet visited.
10.  D' ← D' ∪ min(m_B, |B_i|) samples of B_i drawn at random; 𝔹 ← 𝔹 − {B_i}.
11. return D'.

Choices this module makes where the paper is silent, and why:

* Scale (line 8). Raw target and small efforts live on different scales (another model, another
  number of LoRA parameters), so a raw V_i of, say, 40 would hand the first region the whole
  budget. Line 7 is run for every region first and V is normalised to mean 1 over regions: V_i
  then says how much more (or less) than average the target still has to learn in region i,
  which is the paper's intent. The target cost is the same (the same samples are verified).
* Never over budget (line 10). With V_i > 1, m_B can exceed what is left; a region takes at most
  m − |D'|.
* Exact size. The loop can end under m (floors, small regions). By default the coreset is topped
  up to exactly m from unselected samples, regions with the largest V_i first, at random within a
  region, and the number topped up is recorded; ``fill=False`` keeps the paper's "≤ m".
* m = 0 gives an empty selection without calling the target, as every method's budget check
  allows (:func:`~speccore.selection.score_based.check_budget`).

The authors' code: ``allocation="reference"``
---------------------------------------------

:func:`staff_reference_select` follows the authors' public script (``selection/
selection-gemma.py`` in github.com/shiningrain/STAFF) where it departs from the paper:

* it first removes the top 10% of small-model scores, here at most ⌊p·N⌋ of them, so that m
  stays reachable when p < 0.1;
* a region with at most b_v samples is not verified and gets min(|B_i|, ⌊(m − |D'|)/|𝔹|⌋), the
  even share; a verified region gets ⌊(m − |D'|)·V_i / Σ V⌋, the sum over the verified regions
  not yet visited (the share V_i / Σ V is computed first, so the last region's share is exactly
  1 and its budget exactly what is left);
* a region gives its highest-scoring samples rather than random ones;
* the top-up draws at random from every sample of the pool (after the cut) not yet taken.

Where it still differs from the script, and why:

* Region edges. The script's regions are right-closed (edge_{j−1} < s ≤ edge_j, with edges
  s_min + j·w and the last one min(s_min + K·w, s_max)); speccore's are left-closed,
  [s_min + j·w, s_min + (j+1)·w) with s_max in the last region, one binning for STAFF and CCS
  (:mod:`.regions`). Only a sample lying exactly on an edge lands in the next region. The
  script's last edge can round below s_max: its maximum sample then falls in no region and is
  never selected (about 16% of seeds on identical inputs). Here every sample of the pool is in
  a region.
* Scores. The script computes V on min-max normalised scores; a verified region whose drawn
  samples all score 0 (the minimum) divides by zero. Here V uses raw scores, and a region whose
  small scores sum to 0 counts as average (V_i = 1) rather than failing or giving NaN.
* Randomness. The script draws with Python's global ``random``; here every draw comes from
  ``rng_for(seed, STAFF_SALT)``, so one seed gives one coreset, but not the script's draws.
* V's scale. V is normalised to mean 1 as in the paper path; the share V_i / Σ V does not
  depend on the scale, so the budgets are the script's.

The target model is never fine-tuned here and sees only the verified samples (≤ K·b_v): that is
where STAFF's time saving comes from.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, ClassVar, Literal

import numpy as np

from ..utils.errors import ConfigError
from .agreement import spearman
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
from .regions import equal_width_regions, region_members
from .score_based import check_budget, check_scores
from .scores_file import load_scores_file

logger = logging.getLogger(__name__)

AGREEMENT_WARN_BELOW = 0.3
REFERENCE_CUT = Fraction(1, 10)
STAFF_SALT = "staff"

VerifyFn = Callable[[np.ndarray], np.ndarray]
# Picks k of the given members (the paper's path: at random).
PickFn = Callable[[np.ndarray, int], np.ndarray]


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
    fill: bool = True,
) -> Selection:
    """Algorithm 1, stage 2, over precomputed speculative scores (the paper's allocation).

    ``verify(indices)`` returns the target's scores of those samples; ``None`` is the paper's
    no-verification ablation (every V_i = 1).
    """
    scores = check_scores(scores)
    check_budget(m, len(scores))
    if m == 0:
        return _selection(scores, m, [], verify, "paper", n_filled=0, cut=0)
    rng = rng_for(seed, STAFF_SALT)

    def at_random(members: np.ndarray, k: int) -> np.ndarray:
        return rng.choice(members, size=k, replace=False)

    blocks = split_regions(scores, regions)  # line 3, in line 6's order
    agreement = verify_regions(blocks, scores, verify, verify_per_region, rng)  # lines 7-8
    allocate_paper(blocks, m, at_random)  # lines 4-6, 9-10
    n_filled = fill_to_budget(blocks, m, at_random) if fill else 0
    return _selection(scores, m, blocks, verify, "paper", n_filled, cut=0, agreement=agreement)


def staff_reference_select(
    scores: np.ndarray,
    m: int,
    *,
    regions: int = 50,
    verify_per_region: int = 10,
    verify: VerifyFn | None,
    seed: int = 0,
    fill: bool = True,
    prune_rate: float | None = None,
) -> Selection:
    """The authors' script (see the module notes): cut, even shares for small regions,
    ⌊m_left·V_i/ΣV⌋ for verified ones, highest scores first, random top-up from the pool.

    ``prune_rate`` sets the cut's ⌊p·N⌋ limit (default: 1 − m/N).
    """
    scores = check_scores(scores)
    check_budget(m, len(scores))
    if m == 0:
        return _selection(scores, m, [], verify, "reference", n_filled=0, cut=0)
    rng = rng_for(seed, STAFF_SALT)
    pool, cut = _reference_cut(scores, m, prune_rate)
    blocks = split_regions(scores, regions, pool)
    # The script verifies only the regions larger than b_v; the others get an even share.
    large = [b for b in blocks if len(b.members) > verify_per_region]
    agreement = verify_regions(large, scores, verify, verify_per_region, rng)
    allocate_reference(blocks, scores, m, verified={b.id for b in large} if verify else None)
    n_filled = fill_from_pool(blocks, pool, m, rng) if fill else 0
    return _selection(scores, m, blocks, verify, "reference", n_filled, cut, agreement)


def split_regions(scores: np.ndarray, k: int, pool: np.ndarray | None = None) -> list[Region]:
    """Line 3, in line 6's visiting order: K equal-width regions over the pool's scores, empty
    ones dropped, smallest first, ties broken by the lower score range. Every sample of the pool
    is in exactly one region (the maximum in the last)."""
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


def _no_agreement() -> dict[str, Any]:
    """The agreement record of a run that verified nothing."""
    return {"spearman": None, "n": 0, "indices": [], "small": [], "target": []}


def verify_regions(
    blocks: list[Region],
    scores: np.ndarray,
    verify: VerifyFn | None,
    per_region: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Lines 7-8, done for every region up front so that V can be normalised to mean 1.

    The target is called once, on the ≤ K·b_v drawn samples only. Returns the agreement of
    small and target scores over the verified samples, with both scores of every verified sample
    (``indices``, ``small``, ``target``: the bench plots them).
    """
    if verify is None or not blocks:
        return _no_agreement()
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
        small_sum = math.fsum(scores[b.verified].tolist())
        target_sum = math.fsum(target_of[i] for i in b.verified.tolist())
        # A region whose small scores sum to zero (e.g. all at the minimum of min-max normalised
        # scores) carries no ratio: it counts as average below instead of dividing by zero.
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
    rho = spearman(small, target)
    if rho is not None and rho < AGREEMENT_WARN_BELOW:
        logger.warning(
            "small/target score agreement is low (Spearman %.2f over %d verified samples): the "
            "small model's scores hardly predict the target's; try a smaller model of the "
            "target's own family, or another --score (loss agrees better across families)",
            rho,
            len(small),
        )
    return {"spearman": rho, "n": len(small)}


def allocate_paper(blocks: list[Region], m: int, pick: PickFn) -> int:
    """Lines 5-6 and 9-10: m_B = ⌊(m − |D'|)·V_i / |𝔹|⌋, taken with ``pick`` (at random)."""
    selected = 0
    for visited, b in enumerate(blocks):
        left = len(blocks) - visited
        b.budget = max(0, math.floor((m - selected) * b.v / left))
        take = min(b.budget, len(b.members), m - selected)
        b.taken = np.sort(pick(b.members, take))
        selected += take
    return selected


def allocate_reference(
    blocks: list[Region], scores: np.ndarray, m: int, verified: set[int] | None
) -> int:
    """The authors' budgets, highest scores first within a region.

    A region that was not verified gets the even share ⌊m_left / regions left⌋; a verified one
    (``verified`` holds their ids; ``None``: the no-verification ablation, every region counts
    as verified with V = 1) gets ⌊m_left·V_i / Σ V⌋ over the verified regions not yet visited.
    The share V_i / Σ V is summed afresh from the regions still to visit, not kept by
    subtracting from a running total: a running total drifts (0.99999999999997 instead of 1 at
    the last region) and the floor then gives the last region one sample less than is left.
    """
    counts = [verified is None or b.id in verified for b in blocks]
    selected = 0
    for visited, b in enumerate(blocks):
        left = m - selected
        if counts[visited]:
            rest = zip(blocks[visited:], counts[visited:], strict=True)
            v_left = math.fsum(c.v for c, ok in rest if ok)
            share = b.v / v_left if v_left > 0 else 0.0  # the last region: x / x == 1.0 exactly
            b.budget = max(0, math.floor(left * share))
        else:
            b.budget = left // (len(blocks) - visited)
        take = min(b.budget, len(b.members), left)
        b.taken = np.sort(_highest(b.members, scores, take))
        selected += take
    return selected


def fill_to_budget(blocks: list[Region], m: int, pick: PickFn) -> int:
    """Top up to exactly m, regions with the largest V_i first (ties: visiting order), with
    ``pick`` within a region."""
    missing = m - sum(len(b.taken) for b in blocks)
    for b in sorted(blocks, key=lambda b: -b.v):
        if missing <= 0:
            break
        rest = np.setdiff1d(b.members, b.taken)
        extra = min(missing, len(rest))
        b.taken = np.sort(np.concatenate([b.taken, pick(rest, extra)]))
        b.filled = extra
        missing -= extra
    return sum(b.filled for b in blocks)


def fill_from_pool(blocks: list[Region], pool: np.ndarray, m: int, rng: np.random.Generator) -> int:
    """The authors' top-up: the samples still missing, drawn at random from the whole pool
    (every sample left after the cut) that is not yet taken."""
    taken = np.concatenate([b.taken for b in blocks]) if blocks else np.zeros(0, np.int64)
    missing = m - len(taken)
    if missing <= 0:
        return 0
    rest = np.setdiff1d(pool, taken)
    picked = rng.choice(rest, size=min(missing, len(rest)), replace=False)
    for b in blocks:
        extra = np.intersect1d(b.members, picked)
        b.taken = np.sort(np.concatenate([b.taken, extra]))
        b.filled = len(extra)
    return len(picked)


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


def _selection(
    scores: np.ndarray,
    m: int,
    blocks: list[Region],
    verify: VerifyFn | None,
    allocation: str,
    n_filled: int,
    cut: int,
    agreement: dict[str, Any] | None = None,
) -> Selection:
    """The :class:`Selection` of a finished run: the taken samples, each sample's region."""
    n = len(scores)
    region_of = np.full(n, -1, dtype=np.int64)
    for b in blocks:
        region_of[b.members] = b.id
    indices = np.concatenate([b.taken for b in blocks]) if blocks else np.zeros(0, np.int64)
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
            "agreement": agreement or _no_agreement(),
        },
    )


@dataclass
class StaffSettings(MethodSettings):
    """STAFF's settings (Algorithm 1's K and b_v, and the choices around it)."""

    score: Score = field(
        default="effort", metadata={"help": "score of both the speculative and verification stage"}
    )
    regions: int = field(default=50, metadata={"help": "K, regions (strata) of equal score width"})
    verify_per_region: int = field(default=10, metadata={"help": "b_v, target checks per region"})
    allocation: Literal["paper", "reference"] = field(
        default="paper", metadata={"help": "paper (Algorithm 1) or reference (the authors' code)"}
    )
    fill: bool = field(
        default=True, metadata={"help": "top the coreset up to exactly m (--no-fill: paper's <= m)"}
    )
    verification: bool = field(
        default=True, metadata={"help": "--no-verification: ablation with every V_i = 1"}
    )

    def validate(self) -> None:
        super().validate()
        if self.regions < 1:
            raise ConfigError(f"--regions (K) must be >= 1, got {self.regions}")
        if self.verify_per_region < 1:
            raise ConfigError(
                f"--verify-per-region (b_v) must be >= 1, got {self.verify_per_region}"
            )


def verification(score: str, planned_rows: int | None = None) -> ModelWork:
    """The untuned target's ``score`` of the samples STAFF verifies (a fresh LoRA)."""
    return ModelWork(
        "target", score, some_rows=True, stage="target verification", planned_rows=planned_rows
    )


@register_method
class Staff(SelectionMethod):
    """STAFF (and its no-verification ablation with ``verification=False``)."""

    name = "staff"
    description = "speculative coreset selection: small-model effort, target verification"
    random_draws = True
    settings_class = StaffSettings
    needs: ClassVar[tuple[str, ...]] = ("small", "target")
    verification = True

    def verifies(self, settings: StaffSettings) -> bool:
        return settings.verification and self.verification

    def requests(self, config: RunConfig, n: int) -> list[ModelWork]:
        settings: StaffSettings = self.settings(config)
        work = [] if config.scores else [ModelWork("small", settings.score, tuned=True)]
        if self.verifies(settings):
            verified = min(n, settings.regions * settings.verify_per_region)
            work.append(verification(settings.score, verified))
        return work

    def select(self, provider: ScoreProvider, budget: int, seed: int) -> Selection:
        cfg = provider.config
        settings: StaffSettings = self.settings(cfg)
        with provider.stage("small setup"):
            if cfg.scores:  # the user's speculative scores stand in for the small model's
                scores = load_scores_file(cfg.scores, provider.n)
            else:
                scores = provider.get(ModelWork("small", settings.score, tuned=True))
        verify: VerifyFn | None = None
        if self.verifies(settings):
            work = verification(settings.score)

            def verify(indices: np.ndarray) -> np.ndarray:
                with provider.stage("target verification"):
                    return provider.get(work, np.asarray(indices, dtype=np.int64))

        common: dict[str, Any] = {
            "regions": settings.regions,
            "verify_per_region": settings.verify_per_region,
            "verify": verify,
            "seed": seed,
            "fill": settings.fill,
        }
        # The paper's Algorithm 1 and the authors' script are one function each.
        if settings.allocation == "reference":
            return staff_reference_select(scores, budget, prune_rate=cfg.prune_rate, **common)
        return staff_select(scores, budget, **common)


@register_method
class StaffNoVerification(Staff):
    """STAFF's no-verification ablation (every V_i = 1) under a name of its own, so that a bench
    can put it beside STAFF in one grid (``--no-verification`` is a setting of every cell)."""

    name = "staff-no-verification"
    description = "STAFF ablation without target verification: every V_i = 1, no target call"
    needs = ("small",)
    verification = False
