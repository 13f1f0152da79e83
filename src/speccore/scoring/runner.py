"""Score or embed a whole dataset in length-grouped batches, with checkpoint and resume.

The batch plan (which samples go together) is computed up front from the sample lengths and is
deterministic, so a resumed run scores the missing batches with exactly the same composition as
an uninterrupted run, and gets bit-identical scores.
"""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..data.batches import (
    IGNORE_INDEX,
    Batch,
    BatchLoop,
    TokenizedData,
    length_grouped_batches,
    sample_indices,
)
from ..models.speed import adapter_autocast
from ..utils import interrupt
from ..utils.errors import ConfigError, ScoringError
from ..utils.io import fingerprint, load_npz, save_npz
from . import effort, embeddings  # noqa: F401  (register their outputs)
from .losses import eval_mode, kept_positions, model_device
from .outputs import SCORE_FUNCTIONS, BatchFunction, batch_function, get_output

logger = logging.getLogger(__name__)

# (model, batch[, keep=response window or None]) -> per-sample scores
ScoreFunction = BatchFunction

#: Default of ``checkpoint_seconds``: a hard stop (SIGKILL, power loss) loses at most this much.
CHECKPOINT_SECONDS = 30.0


def score_samples(
    model: nn.Module,
    data: TokenizedData,
    score: str,
    *,
    indices: np.ndarray | None = None,
    max_batch_tokens: int = 4096,
    max_batch_size: int | None = None,
    checkpoint: Path | None = None,
    checkpoint_every: int = 256,
    checkpoint_seconds: float | None = CHECKPOINT_SECONDS,
    device: torch.device | str | None = None,
    desc: str = "scoring",
) -> np.ndarray:
    """Score every sample (or those at ``indices``) with ``score`` (a :data:`SCORE_FUNCTIONS` key).

    Returns float64 scores aligned with ``indices`` (or with ``data``). Batches go to ``device``
    (default: the model's device; the model itself is not moved) and the model runs in eval
    mode, its modes restored afterwards, a half-precision base with float32 adapters under
    autocast (:func:`~speccore.models.speed.adapter_autocast`). A non-finite score raises
    :class:`ScoringError` naming the sample.

    With ``checkpoint``, finished batches are saved there (atomically) once ``checkpoint_every``
    samples or ``checkpoint_seconds`` seconds (None: no time limit) have passed since the last
    save, at the end, when the run fails, and when a stop signal arrives inside
    :func:`speccore.utils.interrupt.interruptible` (then :class:`speccore.utils.interrupt.Interrupted` is
    raised after the batch in progress is saved). A later call with the same request (score,
    indices, data and batching) scores only the missing batches and logs what it resumed. The
    checkpoint does not identify the model: use one path per model. It is never deleted here.
    """
    fn = _score_function(score)
    idx = _check_args(data, indices, max_batch_tokens, max_batch_size)
    if checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every must be at least 1, got {checkpoint_every}")
    if checkpoint_seconds is not None and not checkpoint_seconds > 0:
        raise ConfigError(f"checkpoint_seconds must be > 0 or None, got {checkpoint_seconds}")
    plan = _plan(data, idx, max_batch_tokens, max_batch_size)
    state = _Progress(plan, checkpoint, checkpoint_every, checkpoint_seconds)
    if checkpoint is not None:
        state.key = fingerprint(
            "score-checkpoint", score, idx, max_batch_tokens, max_batch_size, data.fingerprint()
        )
        state.load()
    logger.debug("%s: %d samples in %d batches (%d done)", score, len(idx), len(plan), state.n_done)
    dev = model_device(model) if device is None else device
    try:
        with (
            eval_mode(model),
            adapter_autocast(model),
            BatchLoop(
                data,
                plan,
                indices=idx,
                device=dev,
                skip=frozenset(state.done),
                desc=desc,
                window=kept_positions,
            ) as loop,
        ):
            for batch in loop:
                values = _call(fn, model, batch).detach().double().cpu().numpy()
                _check_finite(values, batch.samples, batch.tensors, score)
                state.record(batch.number, batch.rows, values)
                interrupt.stop_point(state.save_now, len(idx))
    except BaseException as e:
        state.save(quiet=True)  # keep what is done, then let the error through
        if isinstance(e, interrupt.Interrupted):
            e.update(state.n_saved, len(idx), "samples")
        raise
    state.save()
    return state.scores


def embed_samples(
    model: nn.Module,
    data: TokenizedData,
    *,
    indices: np.ndarray | None = None,
    max_batch_tokens: int = 4096,
    max_batch_size: int | None = None,
    device: torch.device | str | None = None,
    desc: str = "embedding",
    output: str = "embedding",
) -> np.ndarray:
    """A vector ``output`` of every sample (default: response-token mean embeddings, see
    :func:`~speccore.scoring.embeddings.embedding_batch`), ``[n, D]`` float32.

    Rows are aligned with ``indices`` (or with ``data``); batching as in :func:`score_samples`.
    """
    fn = batch_function(output)
    idx = _check_args(data, indices, max_batch_tokens, max_batch_size)
    plan = _plan(data, idx, max_batch_tokens, max_batch_size)
    hidden = int(getattr(getattr(model, "config", None), "hidden_size", 0) or 0)
    out: np.ndarray | None = None
    dev = model_device(model) if device is None else device
    with eval_mode(model), BatchLoop(data, plan, indices=idx, device=dev, desc=desc) as loop:
        for batch in loop:
            values = fn(model, batch.tensors).float().cpu().numpy()
            bad = ~np.isfinite(values).all(axis=1)
            if bad.any():
                raise ScoringError(
                    f"sample {batch.samples[bad.argmax()]}: embedding is not finite; "
                    "check the model weights"
                )
            if out is None:
                out = np.zeros((len(idx), values.shape[1]), dtype=np.float32)
            out[batch.rows] = values
    return out if out is not None else np.zeros((0, hidden), dtype=np.float32)


def _score_function(score: str) -> ScoreFunction:
    if score not in SCORE_FUNCTIONS:
        get_output(score)  # an unknown name: the error lists the valid ones
        raise ConfigError(f"{score!r} is a vector output; score_samples takes scalar outputs")
    return SCORE_FUNCTIONS[score]


def _call(fn: ScoreFunction, model: nn.Module, batch: Batch) -> Tensor:
    """``fn`` on the batch, handing it the response window read on the host (no device sync)
    when it takes ``keep``; a score function of ``(model, batch)`` alone works too."""
    if fn not in _TAKES_KEEP:
        try:
            names = inspect.signature(fn).parameters
            _TAKES_KEEP[fn] = "keep" in names or any(
                p.kind == p.VAR_KEYWORD for p in names.values()
            )
        except (TypeError, ValueError):
            _TAKES_KEEP[fn] = False
    if _TAKES_KEEP[fn]:
        return fn(model, batch.tensors, keep=batch.keep)
    return fn(model, batch.tensors)


_TAKES_KEEP: dict[ScoreFunction, bool] = {}


def _check_args(
    data: TokenizedData,
    indices: np.ndarray | None,
    max_batch_tokens: int,
    max_batch_size: int | None,
) -> np.ndarray:
    """The sample indices to process, as int64; bad arguments raise :class:`ConfigError`."""
    if max_batch_tokens < 1:
        raise ConfigError(f"max_batch_tokens must be at least 1, got {max_batch_tokens}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ConfigError(f"max_batch_size must be at least 1 or None, got {max_batch_size}")
    return sample_indices(indices, len(data))


def _plan(
    data: TokenizedData, idx: np.ndarray, max_batch_tokens: int, max_batch_size: int | None
) -> list[np.ndarray]:
    """Batches of *positions* into ``idx`` (so repeated indices simply get scored twice)."""
    if idx.size == 0:
        return []
    return length_grouped_batches(data.lengths[idx], max_batch_tokens, max_batch_size)


def _check_finite(
    values: np.ndarray, samples: np.ndarray, batch: dict[str, Tensor], score: str
) -> None:
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size == 0:
        return
    row = int(bad[0])
    sample = int(samples[row])
    if not bool((batch["labels"][row, 1:] != IGNORE_INDEX).any()):
        raise ScoringError(
            f"sample {sample}: no response tokens to score (every label after the first "
            "position is -100); fix its labels or drop the row"
        )
    raise ScoringError(
        f"sample {sample}: {score} is {values[row]}; check the data row or lower the learning rate"
    )


class _Progress:
    """Scores done so far, and their checkpoint file (whole batches only)."""

    def __init__(
        self, plan: list[np.ndarray], path: Path | None, every: int, seconds: float | None
    ) -> None:
        self.plan = plan
        self.scores = np.full(sum(len(b) for b in plan), np.nan, dtype=np.float64)
        self.done: set[int] = set()
        self.path = None if path is None else Path(path)
        self.every, self.seconds = every, seconds
        self.key = ""
        self.n_done = 0  # samples in done batches
        self.n_saved = 0  # samples in batches on disk (all done ones without a path: none)
        self.unsaved = 0
        self.last_save = time.monotonic()

    def record(self, batch: int, positions: np.ndarray, values: np.ndarray) -> None:
        self.scores[positions] = values
        self.done.add(batch)
        self.n_done += len(positions)
        self.unsaved += len(positions)
        overdue = self.seconds is not None and time.monotonic() - self.last_save >= self.seconds
        if self.unsaved >= self.every or overdue:
            self.save()

    def save_now(self) -> int:
        """Save, and return how many samples are on disk (for an interrupted run's message)."""
        self.save()
        return self.n_saved

    def save(self, quiet: bool = False) -> None:
        """Write the done batches atomically (nothing to do without a path or new work)."""
        if self.path is None or self.unsaved == 0:
            return
        batches = np.array(sorted(self.done), dtype=np.int64)
        try:
            save_npz(self.path, key=np.array(self.key), batches=batches, scores=self.scores)
        except OSError as e:
            if not quiet:
                raise
            logger.warning("could not save the scoring checkpoint %s: %s", self.path, e)
            return
        self.unsaved = 0
        self.n_saved = self.n_done
        self.last_save = time.monotonic()
        interrupt.report(self.n_saved, len(self.scores), "samples")
        logger.debug("checkpoint %s: %d batches done", self.path, len(batches))

    def load(self) -> None:
        """Take over the done batches of a checkpoint made for this very request."""
        if self.path is None or not self.path.exists():
            return
        plan = self.plan
        try:
            saved = load_npz(self.path)
            key, batches, scores = str(saved["key"]), saved["batches"], saved["scores"]
        except (OSError, ValueError, KeyError) as e:
            logger.warning("ignoring unreadable scoring checkpoint %s: %s", self.path, e)
            return
        if key != self.key or scores.shape != self.scores.shape:
            logger.info(
                "ignoring scoring checkpoint %s: it was made for another request", self.path
            )
            return
        if batches.size and (batches.min() < 0 or batches.max() >= len(plan)):
            logger.warning("ignoring scoring checkpoint %s: batch numbers out of range", self.path)
            return
        self.done = {int(b) for b in batches}
        for b in self.done:
            self.scores[plan[b]] = scores[plan[b]]
        self.n_done = self.n_saved = sum(len(plan[b]) for b in self.done)
        interrupt.report(self.n_saved, len(self.scores), "samples")
        logger.info("resumed %d of %d samples from %s", self.n_done, len(self.scores), self.path)
