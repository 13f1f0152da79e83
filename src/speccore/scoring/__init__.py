"""Per-sample scores (effort, loss, EL2N) and embeddings, exact and batched."""

from __future__ import annotations

from .effort import effort_batch, effort_reference
from .embeddings import embedding_batch
from .losses import (
    ResponseLoss,
    el2n_batch,
    loss_batch,
    response_loss,
    sample_losses,
    token_losses,
)
from .runner import SCORE_FUNCTIONS, embed_samples, score_samples

__all__ = [
    "SCORE_FUNCTIONS",
    "ResponseLoss",
    "effort_batch",
    "effort_reference",
    "el2n_batch",
    "embed_samples",
    "embedding_batch",
    "loss_batch",
    "response_loss",
    "sample_losses",
    "score_samples",
    "token_losses",
]
