"""Where the checkpoints of a fine-tune lie: what :class:`~speccore.selection.base.ModelWork`'s
``checkpoints`` means.

A fine-tune that some requested work reads at checkpoints keeps LoRA snapshots at the
:data:`SNAPSHOT_GRID` = 12 grid points j/12 of its optimizer steps (rounded half up to a step).
C checkpoints take C of the 13 points 0, 1/12, …, 1 evenly spaced, the untuned start (j = 0: a
fresh LoRA is the identity) and the tuned end (j = 12) included: grid point round(c·12/(C−1))
for c = 0..C−1. The spacing is exact when C − 1 divides 12 (C = 2, 3, 4, 5, 7, 13) and the
nearest grid point otherwise; 2 ≤ C ≤ 13. One fixed grid for every C means a rerun with another
C reads the same snapshots instead of fine-tuning again. A fine-tune of fewer than 12 steps maps
several grid points to one step: those columns repeat.
"""

from __future__ import annotations

from ..utils.errors import ConfigError

#: A fine-tune read at checkpoints keeps LoRA snapshots at j/SNAPSHOT_GRID of its steps.
SNAPSHOT_GRID = 12


def checkpoint_grid(checkpoints: int) -> list[int]:
    """Grid points (0..SNAPSHOT_GRID) of C evenly spaced checkpoints, both ends included:
    round(c·G/(C−1)), halves rounded up, computed in integers."""
    check_checkpoints(checkpoints)
    gaps = checkpoints - 1
    return [(2 * c * SNAPSHOT_GRID + gaps) // (2 * gaps) for c in range(checkpoints)]


def grid_step(point: int, n_steps: int) -> int:
    """The optimizer step of grid point ``point`` in a fine-tune of ``n_steps`` steps:
    round(point·n_steps/G), halves rounded up."""
    return (2 * point * n_steps + SNAPSHOT_GRID) // (2 * SNAPSHOT_GRID)


def checkpoint_steps(n_steps: int, checkpoints: int) -> list[int]:
    """The optimizer steps of C evenly spaced checkpoints (0: untuned; ``n_steps``: tuned)."""
    return [grid_step(j, n_steps) for j in checkpoint_grid(checkpoints)]


def snapshot_steps(n_steps: int) -> list[int]:
    """The steps at which the small fine-tune saves a LoRA snapshot: every inner grid point
    (the ends are the fresh and the tuned adapter, which need no snapshot)."""
    steps = {grid_step(j, n_steps) for j in range(1, SNAPSHOT_GRID)}
    return sorted(s for s in steps if 0 < s < n_steps)


def check_checkpoints(checkpoints: int) -> None:
    if not 2 <= checkpoints <= SNAPSHOT_GRID + 1:
        raise ConfigError(
            f"checkpoints must be in [2, {SNAPSHOT_GRID + 1}] (the untuned start, the "
            f"tuned end and points between them on a grid of {SNAPSHOT_GRID}), got {checkpoints}"
        )
