"""Per-token and per-sample losses and EL2N, plus the forward helpers every scorer shares.

Conventions used throughout :mod:`speccore.scoring`:

* a batch is what :func:`speccore.data.tokenized.collate` returns (``input_ids``,
  ``attention_mask``, ``labels`` with ``-100`` on the prompt and on padding);
* the usual causal shift applies: the logits at position ``t`` predict token ``t + 1``, so
  ``logits[:, :-1]`` are compared with ``labels[:, 1:]``;
* a sample's loss is the mean cross-entropy over its counted (response) tokens; a sample with no
  counted token gets ``nan`` so that the runner reports it instead of scoring it 0;
* scores come back as float64 tensors on the CPU, one per sample.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.tokenized import IGNORE_INDEX


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode (no dropout) for the block, then restore every module's mode.

    Modes are restored per module, so a model that was deliberately half in train mode comes
    back exactly as it was.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted from each sample's first real token.

    With left padding, a model that numbers positions by column would give a padded sample other
    positions than it gets alone; counting real tokens makes a sample's score independent of the
    padding around it.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward(model: nn.Module, batch: dict[str, Tensor], **kwargs: Any) -> Any:
    """Run ``model`` on a collated batch (no labels: the scorers compute their own losses)."""
    mask = batch["attention_mask"]
    return model(
        input_ids=batch["input_ids"],
        attention_mask=mask,
        position_ids=position_ids(mask),
        use_cache=False,
        **kwargs,
    )


def token_losses(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Shifted per-token cross-entropy ``[B, T-1]`` (float32) and the mask of counted positions.

    Entry ``[b, t]`` is the loss of predicting ``labels[b, t + 1]`` from ``logits[b, t]``; it is 0
    where that label is ``-100``.
    """
    batch, length, vocab = logits.shape
    # Shift the labels left instead of slicing the logits: the logits stay contiguous, so the
    # (large) [B, T, V] tensor is not copied; the last column has no target and is dropped.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    ce = F.cross_entropy(
        logits.reshape(batch * length, vocab).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(batch, length)[:, :-1]
    return ce, labels[:, 1:] != IGNORE_INDEX


def sample_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over each sample's counted tokens, ``[B]`` (``nan`` if none counts)."""
    ce, mask = token_losses(logits, labels)
    return ce.sum(-1) / _counts(mask)


def loss_batch(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Per-sample mean loss over response tokens, float64 on the CPU, shape ``[B]``."""
    with torch.inference_mode(), eval_mode(model):
        logits = forward(model, batch).logits
        losses = sample_losses(logits, batch["labels"])
    return as_output(losses)


def el2n_batch(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Per-sample EL2N: mean over response tokens of ``||softmax(z_t) - onehot(y_t)||_2``.

    ``z_t`` are the logits that *predict* token ``y_t`` (shifted by one position), and the error
    vector uses probabilities, as the EL2N paper (Paul et al., 2021) defines it. Note that the
    authors' public code for LLM fine-tuning compares position ``t`` with label ``t`` and uses raw
    logits; we follow the paper's definition instead. Float64 on the CPU, shape ``[B]``; ``nan``
    for a sample with no response token.
    """
    with torch.inference_mode(), eval_mode(model):
        logits = forward(model, batch).logits
        labels = batch["labels"]
        mask = labels[:, 1:] != IGNORE_INDEX
        # Only the counted positions: a [N, V] softmax rather than [B, T, V].
        z = logits[:, :-1][mask].float()
        y = labels[:, 1:][mask]
        p = z.softmax(-1)
        p_y = p.gather(-1, y[:, None]).squeeze(-1)
        # ||p - e_y||^2 = sum(p^2) - 2 p_y + 1; clamp the rounding error below 0.
        err = ((p * p).sum(-1) - 2 * p_y + 1).clamp(min=0).sqrt()
        per_token = torch.zeros(mask.shape, dtype=err.dtype, device=err.device)
        per_token[mask] = err
        el2n = per_token.sum(-1) / _counts(mask)
    return as_output(el2n)


def as_output(t: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """A plain CPU copy of a score tensor.

    Called outside ``inference_mode``: the copy is an ordinary tensor, so callers may modify it
    in place (an inference tensor would refuse).
    """
    return t.detach().to(device="cpu", dtype=dtype).clone()


def _counts(mask: Tensor) -> Tensor:
    """Counted positions per row as float, ``nan`` where a row counts none."""
    n = mask.sum(-1).float()
    return torch.where(n > 0, n, torch.full_like(n, float("nan")))
