"""Token-level selection (Rho-1-style excess loss) on top of a sample-level coreset.

:func:`speccore.run.tokens.select_tokens` scores the response tokens of the kept rows and returns 0/1 masks over the
target's tokens; :func:`save_token_masks` / :func:`load_token_masks` store them as
``token_masks.npz``, :func:`attach_token_masks` puts them on :class:`~speccore.data.TokenizedData`
for :func:`speccore.train.finetune`, and :func:`export_labels` / :func:`save_token_labels` give a
``labels`` field with -100 on dropped tokens (``token_labels.jsonl``) for other trainers.
"""

from __future__ import annotations

from .align import map_scores, response_offsets, response_offsets_batch
from .masks import (
    attach_token_masks,
    export_labels,
    full_masks,
    keep_count,
    kept_fraction,
    load_token_masks,
    save_token_labels,
    save_token_masks,
    select_response_tokens,
)
from .scores import Ragged, excess_loss, load_ragged, save_ragged, token_losses_of

__all__ = [
    "Ragged",
    "attach_token_masks",
    "excess_loss",
    "export_labels",
    "full_masks",
    "keep_count",
    "kept_fraction",
    "load_ragged",
    "load_token_masks",
    "map_scores",
    "response_offsets",
    "response_offsets_batch",
    "save_ragged",
    "save_token_labels",
    "save_token_masks",
    "select_response_tokens",
    "token_losses_of",
]
