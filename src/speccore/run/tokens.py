"""Token-level selection on a coreset (the model work; :mod:`speccore.tokens` holds the pure
parts: scores, alignment, masks): excess-loss scores, cross-fitting, masks in the target's
tokens.

Given the rows a sample-level method kept, :func:`select_tokens` scores every response token by
Rho-1's excess loss Δ_t = ℓ_base(t) − ℓ_tuned(t) and keeps the top ``token_keep`` fraction:

* ℓ_tuned comes from the small model after its task LoRA fine-tune. By default it is
  *cross-fitted*: the data is split in two halves (seeded by ``--tune-seed``), one fresh adapter
  is tuned on each half and scores the rows of the *other* half, so no token is scored by a
  model that memorised it (a memorised token has ℓ_tuned ≈ 0 and would look maximally
  informative). Two half-data fine-tunes cost as much as one full one. ``--no-token-crossfit``
  reuses the STAFF adapter instead, which scores its own training rows; the info says so.
* ℓ_base is the untuned small model (``--token-scorer small``) or the untuned target
  (``target``: one target forward pass over the coreset only), always with the LoRA disabled.
* The masks apply to the *target's* tokens. Where the two tokenizers cut a response the same
  way, scores carry over one to one; elsewhere through character offsets
  (:func:`speccore.tokens.align.map_scores`), EOS mapped to EOS.

Adapters of the halves are cached like every other adapter (keyed by model, data, LoRA and
training settings), so a rerun with another ``token_keep`` or ranking does no fine-tuning.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data import Formatting, format_rows, row_label
from ..data.batches import TokenizedData
from ..tokens.align import map_scores, response_tokens_batch
from ..tokens.masks import (
    attach_token_masks,
    full_masks,
    kept_fraction,
    save_token_labels,
    save_token_masks,
    select_response_tokens,
)
from ..tokens.scores import Ragged, excess_loss, response_positions, save_ragged, token_losses_of
from ..utils.errors import ConfigError, DataError
from ..utils.io import write_json

if TYPE_CHECKING:
    from peft import PeftModel

    from ..config import SelectConfig
    from ..selection import Selection
    from .provider import ModelProvider
    from .slot import ModelSlot

logger = logging.getLogger(__name__)


@dataclass
class TokenSelection:
    """Token masks for the kept rows of a coreset, in the target's tokenisation.

    ``masks[k]`` covers the full sequence (prompt + response) of row ``indices[k]``; ``scores[k]``
    holds the excess loss of each of its response tokens, EOS last (``nan``: no score, kept).
    ``info`` records the scorer, whether the scores were cross-fitted, and the kept fraction.
    """

    indices: np.ndarray
    masks: list[list[int]]
    scores: Ragged | None
    info: dict[str, Any] = field(default_factory=dict)

    def attach(self, target_data: TokenizedData) -> TokenizedData:
        """The kept rows of the target's tokenised data, with these masks (for fine-tuning)."""
        return attach_token_masks(target_data, self.indices, self.masks)

    def save(
        self, folder: str | os.PathLike[str], target_data: TokenizedData | None = None
    ) -> None:
        """``token_masks.npz``, ``token_scores.npz`` and ``token_selection.json`` in ``folder``;
        with ``target_data`` (the target's tokenisation of all rows) also
        ``token_labels.jsonl``, ready for HF ``Trainer`` or TRL."""
        folder = Path(folder)
        save_token_masks(folder / "token_masks.npz", self.masks, self.indices)
        if target_data is not None:
            save_token_labels(folder / "token_labels.jsonl", target_data, self.masks, self.indices)
        if self.scores is not None:
            save_ragged(folder / "token_scores.npz", self.scores, indices=self.indices)
        write_json(folder / "token_selection.json", self.info)


def select_tokens(
    provider: ModelProvider, selection: Selection, cfg: SelectConfig
) -> TokenSelection:
    """Score the response tokens of ``selection``'s rows and keep the top ``cfg.token_keep``.

    With ``token_keep == 1`` nothing is scored: every mask is all ones (sample-level training).
    """
    _check_models(cfg)
    rows = np.asarray(selection.indices, dtype=np.int64)
    target = provider.target
    if cfg.token_keep >= 1:
        flags = Ragged.from_rows(
            [np.ones(len(response_positions(target.data.labels[i]))) for i in rows], np.uint8
        )
        masks = full_masks(target.data, rows, flags)
        info = _info(cfg, None, None, 1.0, len(flags.values))
        return TokenSelection(rows, masks, None, info)
    small = provider.small
    with provider.stage("token scoring"):
        tuned, crossfit, reason = _tuned_losses(provider, small, rows, cfg)
        scores = _target_scores(provider, small, target, rows, tuned, cfg)
    flags = select_response_tokens(scores, cfg.token_keep, cfg.token_rank)
    masks = full_masks(target.data, rows, flags)
    info = _info(cfg, crossfit, reason, kept_fraction(flags), len(flags.values))
    logger.info(
        "token selection: kept %.1f%% of %d response tokens (%s ranking, %s scorer, %s)",
        100 * info["kept_fraction"],
        len(flags.values),
        cfg.token_rank,
        cfg.token_scorer,
        "cross-fitted" if crossfit else f"not cross-fitted: {reason}",
    )
    return TokenSelection(rows, masks, scores, info)


def crossfit_halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of ``range(n)`` into two halves (sorted; the first gets the odd one)."""
    if n < 2:
        raise ConfigError(f"cross-fitting needs at least 2 rows, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    cut = n - n // 2
    return np.sort(order[:cut]), np.sort(order[cut:])


# ---------------------------------------------------------------------------------------------
# ℓ_tuned: cross-fitted halves or the STAFF adapter
# ---------------------------------------------------------------------------------------------


def _tuned_losses(
    provider: ModelProvider, slot: ModelSlot, rows: np.ndarray, cfg: SelectConfig
) -> tuple[Ragged, bool, str | None]:
    """ℓ_tuned of ``rows`` on the small model, and (cross-fitted?, why not)."""
    reason = _no_crossfit_reason(slot, cfg)
    if reason is None:
        return _crossfit_losses(provider, slot, rows, cfg), True, None
    logger.info("token scores not cross-fitted (%s): tuned losses from the STAFF adapter", reason)
    model = slot.use_tuned(cfg.small_epochs)
    return _losses(model, slot.data, rows, cfg, "tuned small token losses"), False, reason


def _no_crossfit_reason(slot: ModelSlot, cfg: SelectConfig) -> str | None:
    if not cfg.token_crossfit:
        return "--no-token-crossfit"
    if slot.adapter_path is not None:
        return "--small-adapter given: the rows it was trained on are unknown"
    if len(slot.data) < 2:
        return "fewer than 2 rows"
    return None


def _crossfit_losses(
    provider: ModelProvider, slot: ModelSlot, rows: np.ndarray, cfg: SelectConfig
) -> Ragged:
    """Each half's adapter scores the kept rows of the other half; rows keep their order."""
    halves = crossfit_halves(len(slot.data), cfg.tune_seed)
    parts: list[np.ndarray | None] = [None] * len(rows)
    for h, trained_on in enumerate(halves):
        scored = np.flatnonzero(~np.isin(rows, trained_on))
        if not len(scored):
            continue
        model = slot.use_tuned(cfg.small_epochs, rows=trained_on)
        losses = _losses(model, slot.data, rows[scored], cfg, f"token losses, half {h + 1}")
        for k, pos in enumerate(scored.tolist()):
            parts[pos] = losses[k].copy()
    assert all(p is not None for p in parts)
    return Ragged.from_rows([p for p in parts if p is not None], np.float32)


# ---------------------------------------------------------------------------------------------
# ℓ_base, Δ and the move to the target's tokens
# ---------------------------------------------------------------------------------------------


def _target_scores(
    provider: ModelProvider,
    small: ModelSlot,
    target: ModelSlot,
    rows: np.ndarray,
    tuned: Ragged,
    cfg: SelectConfig,
) -> Ragged:
    """Δ per response token of the target's tokenisation, row by row."""
    aligner = _Aligner(provider, small, target, rows, cfg)
    if cfg.token_scorer == "small":
        base = _base_losses(small, rows, cfg, "base small token losses")
        return aligner.to_target(excess_loss(base, tuned))
    base = _base_losses(target, rows, cfg, "base target token losses")
    return excess_loss(base, aligner.to_target(tuned))


def _base_losses(slot: ModelSlot, rows: np.ndarray, cfg: SelectConfig, desc: str) -> Ragged:
    """Token losses of the untuned model: the LoRA disabled (also with a user's adapter)."""
    model = slot.use_fresh()
    with model.disable_adapter():
        return _losses(model, slot.data, rows, cfg, desc)


def _losses(
    model: PeftModel, data: TokenizedData, rows: np.ndarray, cfg: SelectConfig, desc: str
) -> Ragged:
    from ..train.batching import resolve_batch_tokens

    tokens = resolve_batch_tokens(cfg.max_batch_tokens, model)
    return token_losses_of(model, data, rows, max_batch_tokens=tokens, desc=desc)


class _Aligner:
    """Moves per-token values of the small model's tokens onto the target's tokens."""

    def __init__(
        self,
        provider: ModelProvider,
        small: ModelSlot,
        target: ModelSlot,
        rows: np.ndarray,
        cfg: SelectConfig,
    ) -> None:
        self.provider, self.small, self.target = provider, small, target
        self.rows, self.cfg = rows, cfg
        self._texts: list[str] | None = None

    def to_target(self, values: Ragged) -> Ragged:
        """``values`` (rows aligned with the small model's response tokens, EOS last) → the
        target's response tokens. Rows tokenised alike are copied unchanged."""
        out: list[np.ndarray] = []
        n_mapped = 0
        for k, i in enumerate(self.rows.tolist()):
            src_ids = _response_ids(self.small.data, i)
            dst_ids = _response_ids(self.target.data, i)
            if src_ids == dst_ids:
                out.append(values[k].copy())
                continue
            out.append(self._map_row(k, i, values[k], len(src_ids) - 1, len(dst_ids) - 1))
            n_mapped += 1
        if n_mapped:
            logger.info("token scores mapped through character offsets for %d rows", n_mapped)
        return Ragged.from_rows(out, np.float32)

    def _map_row(self, k: int, row: int, values: np.ndarray, n_src: int, n_dst: int) -> np.ndarray:
        """Map one row: text tokens through their character spans, EOS to EOS."""
        src = self._offsets(self.small, k, row, n_src)
        dst = self._offsets(self.target, k, row, n_dst)
        mapped = map_scores(src, values[:n_src], dst)
        return np.append(mapped, values[-1]).astype(np.float32)

    def _offsets(self, slot: ModelSlot, k: int, row: int, n: int) -> np.ndarray:
        """Spans of the first ``n`` response tokens (a long response may have been cut)."""
        ids, offsets = response_tokens_batch(slot.loaded.tokenizer, [self._response_text(k)])
        expected = _response_ids(slot.data, row)[:n]
        if ids[0][:n] != expected:
            raise DataError(
                f"{row_label(row)}: the {slot.role} model's response tokens differ when tokenised "
                "alone; cannot align token scores"
            )
        return offsets[0][:n]

    def _response_text(self, k: int) -> str:
        if self._texts is None:
            subset = self.provider.dataset.select(self.rows.tolist())
            fmt = Formatting.from_config(self.cfg)
            _, self._texts = format_rows(subset, fmt, self.target.loaded.tokenizer)
        return self._texts[k]


def _response_ids(data: TokenizedData, row: int) -> list[int]:
    labels = data.labels[row]
    return [int(labels[p]) for p in response_positions(labels)]


def _check_models(cfg: SelectConfig) -> None:
    if not cfg.target:
        raise ConfigError("token-level selection needs --target: the token masks use its tokens")
    if not cfg.small and cfg.token_keep < 1:
        raise ConfigError("--token-keep < 1 needs --small: it scores the tokens")


def _info(
    cfg: SelectConfig,
    crossfit: bool | None,
    reason: str | None,
    fraction: float,
    n_tokens: int,
) -> dict[str, Any]:
    info: dict[str, Any] = {
        "token_keep": cfg.token_keep,
        "rank": cfg.token_rank,
        "scorer": None if crossfit is None else cfg.token_scorer,
        "crossfit": crossfit,
        "kept_fraction": fraction,
        "response_tokens": n_tokens,
    }
    if reason is not None:
        info["crossfit_off_reason"] = reason
    return info
