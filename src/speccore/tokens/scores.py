"""Per-token losses and excess-loss scores, stored as ragged arrays.

Token-level selection follows Rho-1 (Lin et al., "Not All Tokens Are What You Need", 2024): a
token is worth training on when a model that learned the task predicts it much better than a
reference model does. Its score is the *excess loss*

    Δ_t = ℓ_base(t) − ℓ_tuned(t),

with ℓ the shifted next-token cross-entropy (the logits at position t−1 predict token t). Here
ℓ_base comes from the untuned small model (or the untuned target) and ℓ_tuned from the small
model after its task LoRA fine-tune: a high Δ_t marks a token the task teaches, a low or negative
one a token that is already known (or noise the tuned model could not fit). AdaSPEC applies the
same filter to distillation tokens.

Scores of a set of samples are *ragged* (one array per sample, of its response length): they
live in one flat array plus offsets (:class:`Ragged`), saved with :func:`speccore.utils.io.save_npz`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.batches import (
    IGNORE_INDEX,
    BatchLoop,
    TokenizedData,
    length_grouped_batches,
    sample_indices,
)
from ..scoring.losses import eval_mode, model_device, response_loss
from ..utils.errors import ConfigError, DataError, ScoringError
from ..utils.io import load_npz, save_npz

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ragged:
    """Rows of different lengths: row ``i`` is ``values[offsets[i]:offsets[i + 1]]``.

    ``offsets`` is int64 of length ``rows + 1`` starting at 0 and non-decreasing. Compact (one
    array, no Python lists) and cheap to save.
    """

    values: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        offsets = np.asarray(self.offsets)
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0:
            raise ValueError("offsets must be a 1-D array starting at 0")
        if np.any(np.diff(offsets) < 0) or offsets[-1] != len(self.values):
            raise ValueError("offsets must be non-decreasing and end at len(values)")

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[float] | np.ndarray], dtype: Any) -> Ragged:
        """Pack ``rows`` into one flat array of ``dtype``."""
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if len(rows) and offsets[-1]:
            values = np.concatenate([np.asarray(r, dtype=dtype).reshape(-1) for r in rows])
        else:
            values = np.zeros(0, dtype=dtype)
        return cls(values.astype(dtype, copy=False), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        """Row ``i`` (a view: copy it before writing)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows")
        i %= len(self)
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def rows(self) -> list[np.ndarray]:
        return [self[i] for i in range(len(self))]

    def row_ids(self) -> np.ndarray:
        """For every flat value, the row it belongs to."""
        return np.repeat(np.arange(len(self), dtype=np.int64), self.lengths)

    def with_values(self, values: np.ndarray) -> Ragged:
        """Same rows, other values (``values`` flat, as long as :attr:`values`)."""
        return Ragged(np.asarray(values), self.offsets)


def save_ragged(path: str | os.PathLike[str], ragged: Ragged, **extra: np.ndarray) -> None:
    """Save ``ragged`` (as ``values`` + ``offsets``) and ``extra`` arrays, atomically."""
    save_npz(path, values=ragged.values, offsets=ragged.offsets, **extra)


def load_ragged(path: str | os.PathLike[str]) -> tuple[Ragged, dict[str, np.ndarray]]:
    """The :class:`Ragged` saved by :func:`save_ragged`, and the other arrays of the file."""
    try:
        arrays = load_npz(path)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {os.fspath(path)}: {e}") from None
    if "values" not in arrays or "offsets" not in arrays:
        raise DataError(f"{os.fspath(path)} holds no ragged arrays (values + offsets)")
    values, offsets = arrays.pop("values"), arrays.pop("offsets")
    try:
        return Ragged(values, offsets.astype(np.int64)), arrays
    except ValueError as e:
        raise DataError(f"{os.fspath(path)}: {e}") from None


def response_positions(labels: Sequence[int]) -> np.ndarray:
    """Positions that carry a loss (``labels != -100``): the response, EOS last."""
    return np.flatnonzero(np.asarray(labels, dtype=np.int64) != IGNORE_INDEX)


def token_losses_of(
    model: nn.Module,
    data: TokenizedData,
    indices: Sequence[int] | np.ndarray | None = None,
    max_batch_tokens: int = 4096,
    desc: str = "token losses",
) -> Ragged:
    """Per-token cross-entropy of the response tokens of each sample at ``indices``.

    Row ``k`` of the result belongs to sample ``indices[k]`` and holds one float32 loss per
    position ``t`` with ``labels[t] != -100`` (the response, including its EOS), in order: the
    loss of predicting token ``t`` from the logits at ``t − 1``. A response token at position 0
    has no logits to predict it and gets ``nan``. Token masks in ``data`` are ignored: every
    response token is scored. The model runs in eval mode under ``inference_mode``.
    """
    idx = sample_indices(indices, len(data))
    if max_batch_tokens < 1:
        raise ConfigError(f"max_batch_tokens must be at least 1, got {max_batch_tokens}")
    # Score every response token, whatever mask the data carries.
    plain = TokenizedData(data.input_ids, data.labels, data.pad_token_id)
    rows: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * len(idx)
    plan = length_grouped_batches(data.lengths[idx], max_batch_tokens) if len(idx) else []
    device = model_device(model)
    with eval_mode(model), BatchLoop(plain, plan, indices=idx, device=device, desc=desc) as loop:
        for batch in loop:
            for p, losses in zip(
                batch.rows.tolist(), _batch_losses(model, batch.tensors), strict=True
            ):
                _check_finite(
                    losses, int(idx[p]), starts_at_zero=data.labels[idx[p]][0] != IGNORE_INDEX
                )
                rows[p] = losses
    return Ragged.from_rows(rows, np.float32)


def excess_loss(base: Ragged, tuned: Ragged) -> Ragged:
    """Rho-1's excess loss Δ_t = ℓ_base(t) − ℓ_tuned(t), row by row (same shapes)."""
    if not np.array_equal(base.offsets, tuned.offsets):
        raise ValueError("base and tuned losses have different rows or lengths")
    delta = base.values.astype(np.float32) - tuned.values.astype(np.float32)
    return base.with_values(delta)


def _batch_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """The response-token losses of each row of a right-padded batch, in label order.

    :func:`response_loss` covers every counted label but one in column 0, which no logit
    predicts: that one gets ``nan``.
    """
    with torch.inference_mode():
        loss = response_loss(model, batch)
        tokens, mask = loss.tokens.cpu().numpy(), loss.mask.cpu().numpy()
        first = (batch["labels"][:, 0] != IGNORE_INDEX).cpu().numpy()
    return [
        np.concatenate([[np.nan] if first[b] else [], tokens[b][mask[b]]]).astype(np.float32)
        for b in range(len(tokens))
    ]


def _check_finite(losses: np.ndarray, sample: int, starts_at_zero: bool) -> None:
    # A response token at position 0 is nan by construction (no logits predict it); any other
    # non-finite loss is a fault.
    bad = ~np.isfinite(losses)
    if starts_at_zero and len(bad):
        bad[0] = np.isinf(losses[0])
    if bad.any():
        raise ScoringError(
            f"sample {sample}: token loss {losses[bad.argmax()]} at response token "
            f"{int(bad.argmax())}; check the model weights or use --dtype float32"
        )
