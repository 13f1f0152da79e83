"""S2L: SmallToLarge data selection (Yang, Mishra, Chiang and Mirzasoleiman, "SmallToLarge (S2L):
Scalable Data Selection for Fine-tuning Large Language Models by Summarizing Training
Trajectories of Small Models", NeurIPS 2024), Algorithm 1.

Inputs: data D of N samples with their training trajectories on a small model, budget
m = ⌊N·(1−p)⌋, K clusters.

1. Trajectories (asked of the provider as ``ModelWork("small", "loss", tuned=True, checkpoints=C)``): the loss
   of every sample under the small model at C checkpoints of its fine-tune, a vector of length C
   per sample. The loss is speccore's "loss" score, the mean cross-entropy over the response
   tokens, as the authors' ``get_trajectories.py`` takes the model's mean token loss.
2. Cluster the N trajectories into K clusters C_1..C_K with k-means (Euclidean distance on the
   raw losses, as the authors' faiss k-means).
3. S ← ∅; visit the clusters by size, smallest first.
4. Cluster C_k gets R_k = ⌊(m − |S|) / (K − k + 1)⌋, an equal share of what is left over the
   clusters not yet visited; if |C_k| ≤ R_k, S ← S ∪ C_k (all of it);
5. else S ← S ∪ R_k samples of C_k drawn uniformly at random.
6. return S.

Steps 3–5 are CCS's stratified budget loop (:func:`~speccore.selection.ccs.stratified_budget_loop`),
one implementation for both: visiting the smallest clusters first, the loop spends exactly m
(see :mod:`.ccs`), so |S| = m.

Choices this module makes where the paper is silent, and why:

* Which checkpoints. The trajectories come from the same small fine-tune STAFF runs (T =
  ``--small-epochs`` epochs, the same LoRA and training settings), so STAFF then S2L on the same
  data fine-tune the small model once. That fine-tune always keeps LoRA snapshots at the
  :data:`SNAPSHOT_GRID` = 12 grid points j/12 of its optimizer steps (rounded half up to a step);
  ``--s2l-checkpoints`` C takes C of the 13 points 0, 1/12, …, 1 evenly spaced, the untuned
  start (j = 0, the pretrained model: a fresh LoRA is the identity) and the tuned end (j = 12)
  included: grid point round(c·12/(C−1)) for c = 0..C−1. The spacing is exact when C − 1
  divides 12 (C = 2, 3, 4, 5, 7, 13) and the nearest grid point otherwise; 2 ≤ C ≤ 13. A
  fine-tune of fewer than 12 steps maps several grid points to one step: those columns repeat
  (and are scored once). Default C = 7: every half epoch at T = 3, about the number of
  checkpoints the authors' configuration keeps (every 500 of ≈3000 steps).
* The untuned start. The authors' trainer saves its first checkpoint after 500 steps; here the
  start is a checkpoint too (the issue asks for it): how hard a sample is before any tuning is
  part of its trajectory.
* k-means. scikit-learn's ``KMeans`` (Lloyd, k-means++ init, ``n_init`` = 10 fixed, seeded from
  the selection seed with :func:`rng_for`), rather than faiss with 20 iterations: scikit-learn is
  already a dependency and its result does not depend on the hardware. K is capped at the number
  of distinct trajectories (k-means cannot make more non-empty clusters); empty clusters are
  dropped. Default K = 100, the authors' setting on MathInstruct.
* Equal sizes. Clusters of one size are visited in the order of their k-means label.
* Small budgets. With m < K the shares ⌊(m − |S|)/(K − k + 1)⌋ of the smallest clusters are 0:
  the budget goes one sample each to the m largest clusters. That is Algorithm 1 as written;
  nothing is topped up or reordered.
* The authors' code departs from Algorithm 1 in ways not followed here: it first balances over
  the data's sources (MathInstruct's sub-datasets), it leaves clusters of at most 2 samples out
  of the loop and draws the remainder from them at the end, and it replaces a NaN loss by 0
  (here a non-finite loss stops the run, naming the sample).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..utils.errors import ConfigError, ScoringError
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
from .ccs import stratified_budget_loop, stratum_budgets
from .checkpoints import SNAPSHOT_GRID, check_checkpoints, checkpoint_steps
from .score_based import check_budget

logger = logging.getLogger(__name__)

S2L_SALT = "s2l"
KMEANS_SALT = "s2l-kmeans"
KMEANS_N_INIT = 10
TRAJECTORY_STAGE = "small trajectories"


# --- Algorithm 1 ------------------------------------------------------------------------------


def check_trajectories(losses: np.ndarray) -> np.ndarray:
    """The trajectories as an [N, C] float64 array; a non-finite loss names its sample."""
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 2:
        raise ValueError(f"trajectories must be [N, C], got shape {losses.shape}")
    bad = np.flatnonzero(~np.isfinite(losses).all(axis=1))
    if len(bad):
        raise ScoringError(
            f"the loss trajectory of sample {int(bad[0])} is not finite ({len(bad)} in all); "
            "check that every row has a response, or lower the learning rate"
        )
    return losses


def cluster_trajectories(losses: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """Step 2: a k-means label per trajectory (0..k−1), k = min(K, distinct trajectories)."""
    if clusters < 1:
        raise ConfigError(f"--s2l-clusters must be >= 1, got {clusters}")
    losses = check_trajectories(losses)
    if len(losses) == 0:
        return np.zeros(0, dtype=np.int64)
    k = min(clusters, len(np.unique(losses, axis=0)))
    if k == 1:
        return np.zeros(len(losses), dtype=np.int64)
    from sklearn.cluster import KMeans

    state = int(rng_for(seed, KMEANS_SALT).integers(2**31 - 1))
    kmeans = KMeans(n_clusters=k, n_init=KMEANS_N_INIT, random_state=state)
    return np.asarray(kmeans.fit_predict(losses), dtype=np.int64)


def cluster_members(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Non-empty clusters: label → sample indices (ascending), labels ascending."""
    labels = np.asarray(labels, dtype=np.int64)
    return {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}


def balanced_sample(
    labels: np.ndarray, m: int, rng: np.random.Generator
) -> tuple[np.ndarray, dict[int, int]]:
    """Steps 3–5: m samples spread over the clusters (smallest first, an equal share of what is
    left each, all of a cluster smaller than its share), at random within a cluster.

    Returns the sorted indices and each cluster's budget R_k.
    """
    groups = cluster_members(labels)
    check_budget(m, len(labels))
    members = list(groups.values())
    indices = stratified_budget_loop(members, m, rng)
    budgets = stratum_budgets([len(g) for g in members], m)
    return indices, {c: int(b) for c, b in zip(groups, budgets, strict=True)}


def s2l_select(
    losses: np.ndarray, m: int, *, clusters: int, seed: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Algorithm 1 over precomputed trajectories [N, C]: (sorted indices, info).

    ``info`` holds the cluster label of every sample (``clusters``), ``n_clusters`` (non-empty)
    and a ``region_table`` (per cluster: size, budget R_k, taken, mean loss at the first and last
    checkpoint).
    """
    losses = check_trajectories(losses)
    check_budget(m, len(losses))
    labels = cluster_trajectories(losses, clusters, seed)
    indices, budgets = balanced_sample(labels, m, rng_for(seed, S2L_SALT))
    keep = np.zeros(len(losses), dtype=bool)
    keep[indices] = True
    table = [
        {
            "region": c,
            "size": len(members),
            "budget": budgets[c],
            "taken": int(keep[members].sum()),
            "loss_first": float(losses[members, 0].mean()),
            "loss_last": float(losses[members, -1].mean()),
        }
        for c, members in cluster_members(labels).items()
    ]
    info: dict[str, Any] = {
        "clusters": labels.tolist(),
        "n_clusters": len(table),
        "n_clusters_requested": clusters,
        "kmeans_n_init": KMEANS_N_INIT,
        "n_selected": len(indices),
        "region_table": table,
    }
    return indices, info


# --- the method -------------------------------------------------------------------------------


@dataclass
class S2LSettings(MethodSettings):
    """C checkpoints of the small fine-tune and K k-means clusters."""

    s2l_checkpoints: int = field(
        default=7,
        metadata={
            "help": "C, checkpoints of the small fine-tune, evenly spaced over its T epochs, "
            f"untuned start and end included (2..{SNAPSHOT_GRID + 1})"
        },
    )
    s2l_clusters: int = field(
        default=100, metadata={"help": "K, k-means clusters of the loss trajectories"}
    )

    def validate(self) -> None:
        super().validate()
        try:
            check_checkpoints(self.s2l_checkpoints)
        except ConfigError as err:
            raise ConfigError(f"--s2l-{err}") from None
        if self.s2l_clusters < 1:
            raise ConfigError(f"--s2l-clusters must be >= 1, got {self.s2l_clusters}")


def check_small_fine_tune(config: RunConfig) -> None:
    """S2L needs the small model's own fine-tune: a user adapter or T = 0 has no trajectory."""
    if config.small_adapter:
        raise ConfigError(
            "s2l records the small model's fine-tune, which --small-adapter skips; "
            "leave out --small-adapter"
        )
    if config.small_epochs <= 0:
        raise ConfigError(f"s2l needs --small-epochs > 0, got {config.small_epochs}")


def trajectories(checkpoints: int) -> ModelWork:
    """The loss of every sample at C evenly spaced checkpoints of the small fine-tune."""
    return ModelWork("small", "loss", tuned=True, checkpoints=checkpoints, stage=TRAJECTORY_STAGE)


@dataclass
class Trajectories:
    """Per-sample losses at checkpoints of one small-model fine-tune. Column c was computed
    under the adapter after ``steps[c]`` optimizer steps of ``n_steps`` (0: the untuned start;
    ``n_steps``: the tuned adapter)."""

    losses: np.ndarray  # [N, C] float64
    steps: list[int]
    n_steps: int
    epochs: float  # T, the fine-tune's epochs: checkpoint c lies at steps[c] / n_steps · T

    @property
    def checkpoint_epochs(self) -> list[float]:
        return [self.epochs * s / self.n_steps if self.n_steps else 0.0 for s in self.steps]


@register_method
class S2L(SelectionMethod):
    """Balanced sampling over k-means clusters of small-model loss trajectories."""

    name = "s2l"
    description = "SmallToLarge: balanced sampling over clusters of small-model loss trajectories"
    settings_class = S2LSettings
    needs = ("small",)
    random_draws = True

    def requests(self, config: RunConfig, n: int) -> list[ModelWork]:
        return [trajectories(self.settings(config).s2l_checkpoints)]

    def select(self, provider: ScoreProvider, budget: int, seed: int) -> Selection:
        settings: S2LSettings = self.settings(provider.config)
        check_small_fine_tune(provider.config)
        with provider.stage("small setup"):
            losses = provider.get(trajectories(settings.s2l_checkpoints))
            n_steps = provider.fine_tune_steps("small")
        traj = Trajectories(
            losses,
            checkpoint_steps(n_steps, settings.s2l_checkpoints),
            n_steps,
            provider.config.small_epochs,
        )
        with provider.stage("selection"):
            indices, info = s2l_select(
                traj.losses, budget, clusters=settings.s2l_clusters, seed=seed
            )
        logger.info(
            "s2l: %d trajectories of %d checkpoints in %d clusters, kept %d of %d",
            len(traj.losses),
            len(traj.steps),
            info["n_clusters"],
            len(indices),
            provider.n,
        )
        table = info.pop("region_table")
        return Selection(
            method=self.name,
            indices=indices,
            n_total=provider.n,
            budget=budget,
            region_table=table,
            info={
                "score": "loss",
                "checkpoint_steps": traj.steps,
                "checkpoint_epochs": traj.checkpoint_epochs,
                "fine_tune_steps": traj.n_steps,
                "trajectories": traj.losses.tolist(),
                **info,
            },
        )
