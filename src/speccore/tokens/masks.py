"""Which response tokens to train on: top-fraction masks, their sidecar file and label export.

Rho-1 trains only on the tokens with the highest excess loss; here the fraction kept is
``token_keep``, ranked within each sample (``"sample"``: every kept row keeps ⌈keep·n⌉ of its n
response tokens) or over the whole coreset (``"global"``: one cut over all response tokens, so
rows rich in informative tokens keep more of them). The end-of-sequence token is always kept:
dropping it would teach the model never to stop. Tokens without a score (``nan``, e.g. a target
token no small-model token overlaps) are kept too. Prompt positions get mask 1: they carry no
loss anyway, and a mask of 1 leaves their (-100) labels as they are.

A mask row covers the full target-tokenised sequence (prompt + response), the format of
:attr:`speccore.data.TokenizedData.token_masks`; :func:`speccore.data.collate` turns its zeros
into ``-100`` labels.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence

import numpy as np

from ..config import TOKEN_RANKS
from ..data import row_label
from ..data.batches import IGNORE_INDEX, TokenizedData
from ..utils.errors import ConfigError, DataError
from ..utils.io import atomic_open
from .scores import Ragged, load_ragged, response_positions, save_ragged

logger = logging.getLogger(__name__)

# Written into token_masks.npz so that a wrong file is refused with a clear message.
MASKS_FORMAT = "speccore-token-masks-1"


def keep_count(keep: float, n: int) -> int:
    """⌈keep·n⌉, robust to floating point: 0.3·10 is 3.0000000000000004 and 5/7·7 may land just
    above 5; rounding the product to 6 decimals first gives 3 and 5, as meant."""
    if not 0 < keep <= 1:
        raise ConfigError(f"--token-keep must be in (0, 1], got {keep}")
    return math.ceil(round(keep * n, 6))


def select_response_tokens(scores: Ragged, keep: float, rank: str = "sample") -> Ragged:
    """0/1 flags (uint8) over each row's response tokens: the top ``keep`` fraction by score.

    ``scores`` rows are aligned with the response positions, EOS last. The forced tokens (the
    last one of each row, and ``nan`` scores) are kept and count towards the budget; the rest of
    the budget goes to the highest scores. Ties go to the earlier row, then the earlier token.
    """
    if rank not in TOKEN_RANKS:
        raise ConfigError(f"--token-rank must be one of {', '.join(TOKEN_RANKS)}, got {rank!r}")
    values = scores.values.astype(np.float64)
    flags = _forced(scores)
    if rank == "sample":
        for i in range(len(scores)):
            lo, hi = int(scores.offsets[i]), int(scores.offsets[i + 1])
            _fill(flags[lo:hi], values[lo:hi], keep_count(keep, hi - lo), np.zeros(hi - lo))
    else:
        _fill(flags, values, keep_count(keep, len(values)), scores.row_ids())
    return scores.with_values(flags)


def full_masks(
    data: TokenizedData, indices: Sequence[int] | np.ndarray, flags: Ragged
) -> list[list[int]]:
    """Per row ``indices[k]`` of ``data``: 1 on the prompt, ``flags[k]`` on the response."""
    idx = [int(i) for i in indices]
    if len(idx) != len(flags):
        raise ValueError(f"{len(idx)} rows but {len(flags)} rows of token flags")
    masks: list[list[int]] = []
    for k, i in enumerate(idx):
        positions = response_positions(data.labels[i])
        if len(positions) != flags.lengths[k]:
            raise DataError(
                f"{row_label(i)}: {flags.lengths[k]} token flags for {len(positions)} response tokens; "
                "the flags were made for another tokenisation"
            )
        mask = np.ones(len(data.input_ids[i]), dtype=np.int64)
        mask[positions] = flags[k]
        masks.append(mask.tolist())
    return masks


def kept_fraction(flags: Ragged) -> float:
    """Share of the response tokens a set of flags keeps (1.0 for no tokens)."""
    return float(flags.values.mean()) if len(flags.values) else 1.0


def attach_token_masks(
    data: TokenizedData, indices: Sequence[int] | np.ndarray, masks: Sequence[Sequence[int]]
) -> TokenizedData:
    """The rows ``indices`` of ``data`` with their token masks, ready for
    :func:`speccore.train.finetune` (masked tokens get label -100 when batched)."""
    sub = data.subset(indices)
    sub.token_masks = _checked_masks(sub, masks, indices)
    return sub


def export_labels(
    data: TokenizedData,
    masks: Sequence[Sequence[int]],
    indices: Sequence[int] | np.ndarray | None = None,
) -> list[list[int]]:
    """A ``labels`` field for other trainers: the row's labels with -100 where the mask is 0.

    Row ``k`` is row ``indices[k]`` of ``data`` (default: row ``k``).
    """
    idx = range(len(masks)) if indices is None else [int(i) for i in indices]
    sub = data.subset(idx)
    checked = _checked_masks(sub, masks, idx)
    return [
        [t if m else IGNORE_INDEX for t, m in zip(labels, mask, strict=True)]
        for labels, mask in zip(sub.labels, checked, strict=True)
    ]


def save_token_labels(
    path: str | os.PathLike[str],
    data: TokenizedData,
    masks: Sequence[Sequence[int]],
    indices: Sequence[int] | np.ndarray,
) -> None:
    """Write ``token_labels.jsonl`` for other trainers, one kept row per line, atomically.

    Each line holds ``index`` (the row in the input data), the target's ``input_ids``,
    ``labels`` (-100 on the prompt and on dropped tokens, HF's convention: the model shifts them)
    and ``completion_mask`` (1 where a label is learned), the field TRL's collator reads.
    """
    labels = export_labels(data, masks, indices)
    with atomic_open(path) as f:
        for i, row_labels in zip(indices, labels, strict=True):
            line = {
                "index": int(i),
                "input_ids": [int(t) for t in data.input_ids[int(i)]],
                "labels": row_labels,
                "completion_mask": [int(t != IGNORE_INDEX) for t in row_labels],
            }
            f.write(json.dumps(line) + "\n")


def save_token_masks(
    path: str | os.PathLike[str],
    masks: Sequence[Sequence[int]],
    indices: Sequence[int] | np.ndarray,
) -> None:
    """Write ``token_masks.npz``: the rows (``indices``) and their masks, ragged, atomically."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(idx) != len(masks):
        raise ValueError(f"{len(idx)} indices but {len(masks)} masks")
    ragged = Ragged.from_rows([np.asarray(m, dtype=np.uint8) for m in masks], np.uint8)
    if np.any(ragged.values > 1):
        raise ValueError("token masks must hold only 0 and 1")
    save_ragged(path, ragged, indices=idx, format=np.array(MASKS_FORMAT))


def load_token_masks(path: str | os.PathLike[str]) -> tuple[np.ndarray, list[list[int]]]:
    """The ``(indices, masks)`` written by :func:`save_token_masks`."""
    ragged, extra = load_ragged(path)
    if str(extra.get("format", "")) != MASKS_FORMAT or "indices" not in extra:
        raise DataError(f"{os.fspath(path)} is not a speccore token_masks.npz file")
    indices = extra["indices"].astype(np.int64)
    if len(indices) != len(ragged):
        raise DataError(f"{os.fspath(path)}: {len(indices)} indices but {len(ragged)} masks")
    return indices, [row.astype(np.int64).tolist() for row in ragged.rows()]


def _forced(scores: Ragged) -> np.ndarray:
    """Flags with the always-kept tokens set: each row's last token (EOS) and unscored ones."""
    flags = np.isnan(scores.values.astype(np.float64)).astype(np.uint8)
    ends = scores.offsets[1:][scores.lengths > 0] - 1
    flags[ends] = 1
    return flags


def _fill(flags: np.ndarray, values: np.ndarray, budget: int, group: np.ndarray) -> None:
    """Set ``flags`` (in place) on the best unforced tokens until ``budget`` are set.

    Order: higher value first, then lower ``group`` (row), then earlier position.
    """
    room = budget - int(flags.sum())
    if room <= 0:
        return
    free = np.flatnonzero(flags == 0)
    order = np.lexsort((free, group[free], -values[free]))
    flags[free[order[:room]]] = 1


def _checked_masks(
    data: TokenizedData, masks: Sequence[Sequence[int]], indices: Sequence[int] | np.ndarray
) -> list[list[int]]:
    """``masks`` as lists of 0/1, each as long as its (already subset) row of ``data``."""
    if len(masks) != len(data):
        raise DataError(f"{len(masks)} token masks for {len(data)} rows")
    out: list[list[int]] = []
    for k, (mask, ids) in enumerate(zip(masks, data.input_ids, strict=True)):
        row = [int(m) for m in mask]
        if len(row) != len(ids):
            raise DataError(
                f"{row_label(int(indices[k]))}: token mask has {len(row)} positions but the tokenised "
                f"row has {len(ids)}; the masks were made with another tokenizer or --max-length"
            )
        if any(m not in (0, 1) for m in row):
            raise DataError(
                f"{row_label(int(indices[k]))}: a token mask holds values other than 0/1"
            )
        out.append(row)
    return out
