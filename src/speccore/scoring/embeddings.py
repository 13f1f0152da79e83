"""Sample embeddings: the mean last-layer hidden state over a sample's response tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batches import IGNORE_INDEX
from . import losses
from .losses import accepts_logits_to_keep, as_output, eval_mode, forward
from .outputs import register_output


@register_output(
    "embedding",
    version=1,
    vector=True,
    description="mean last hidden state over the response, L2-normalised",
)
def embedding_batch(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean of the last hidden states over response positions, L2-normalised, ``[B, H]`` float32.

    Response positions are those whose label is not ``-100`` (no shift: the hidden state *at* a
    response token). A sample without response tokens gets a zero row. On the CPU.
    """
    # Only hidden states are needed: one logit position instead of T skips almost all of the
    # lm_head, the costliest layer of a large-vocabulary model. hidden_states are not sliced.
    skip = losses.LOGITS_WINDOW and accepts_logits_to_keep(model)
    skip_head = {"logits_to_keep": 1} if skip else {}
    with torch.inference_mode(), eval_mode(model):
        out = forward(model, batch, output_hidden_states=True, **skip_head)
        hidden = out.hidden_states[-1].float()
        mask = (batch["labels"] != IGNORE_INDEX).to(hidden.device, hidden.dtype)
        summed = torch.einsum("bth,bt->bh", hidden, mask)
        mean = summed / mask.sum(-1, keepdim=True).clamp(min=1)
        emb = F.normalize(mean, dim=-1)
    return as_output(emb, torch.float32)
