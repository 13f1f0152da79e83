"""The response-window loss, EL2N, and the forward helpers every scorer and trainer shares.

:func:`response_loss` is *the* loss of speccore: the fine-tune (its gradient), the ``loss``
score, per-token losses (:mod:`speccore.tokens`) and the dry run all compute the next-token
cross-entropy over response tokens through it, so they cannot drift apart.

Conventions used throughout :mod:`speccore.scoring`:

* a batch is what :func:`speccore.data.batches.collate` returns (``input_ids``,
  ``attention_mask``, ``labels`` with ``-100`` on the prompt and on padding);
* the usual causal shift applies: the logits at position ``t`` predict token ``t + 1``, so
  ``logits[:, :-1]`` are compared with ``labels[:, 1:]``;
* a sample's loss is the mean cross-entropy over its counted (response) tokens; a sample with no
  counted token gets ``nan`` so that the runner reports it instead of scoring it 0;
* per-token cross-entropy is computed in float32 whatever the model's dtype (bfloat16 logits
  are upcast, float64 ones rounded, as Hugging Face's loss does), and only at counted positions:
  a prompt-heavy batch never gets a float32 copy of all its logits;
* scores come back as float64 tensors on the CPU, one per sample;
* logits are computed only where a loss needs them (:func:`response_logits`): with a large
  vocabulary the ``lm_head`` costs more than the rest of the network per position, and the prompt
  (whose logits no loss reads) is usually most of the sequence.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batches import IGNORE_INDEX
from .outputs import register_output

#: Compute logits only over the response window (see :func:`response_logits`). Set to False to
#: get logits at every position everywhere (tests that compare both paths, benchmarks, or a model
#: whose ``logits_to_keep`` misbehaves); the scores are the same up to float rounding.
LOGITS_WINDOW = True


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


def response_window(labels: Tensor) -> int:
    """How many trailing positions hold every logit that a loss over ``labels`` reads: ``N``.

    The logits at position ``t`` predict label ``t + 1``, so the earliest logit needed is at
    ``s = j - 1``, ``j`` the first column (>= 1) where *any* sample has a counted label; every
    response token of every sample then lies in the last ``N = T - s`` positions, whatever the
    padding side (right padding only adds ignored positions at the end, left padding only at the
    start). Returns ``1 <= N <= T``; 1 when nothing counts at all (no logit is needed, but
    ``logits_to_keep=0`` would mean "all"). Labels on a GPU cost a host sync: the batch loop
    computes it from the host's copy (:attr:`speccore.data.batches.Batch.keep`).
    """
    length = labels.shape[-1]
    if length < 2:  # no label has a predicting logit
        return length
    counted = (labels[:, 1:] != IGNORE_INDEX).any(0)
    # The first counted label column (argmax returns the first maximum), or T if none counts;
    # one host sync for a batch on the GPU.
    first = torch.where(counted.any(), counted.int().argmax() + 1, length)
    return length - int(first) + 1


_FORWARD_PARAMETERS: dict[type, frozenset[str]] = {}  # model class -> its forward's names


def forward_parameters(model: nn.Module) -> frozenset[str]:
    """The parameter names of ``model``'s forward, read once per model class.

    A PEFT wrapper passes unknown keyword arguments through to the base model, so the base
    model's signature decides. A ``**kwargs`` catch-all names no argument: it may hand one on to
    code that does not expect it.
    """
    get_base = getattr(model, "get_base_model", None)
    base: nn.Module = get_base() if callable(get_base) else model
    cls = type(base)
    if cls not in _FORWARD_PARAMETERS:  # once per class: not a signature inspection per batch
        try:
            names = frozenset(inspect.signature(cls.forward).parameters)
        except (TypeError, ValueError):  # a forward without an introspectable signature
            names = frozenset()
        _FORWARD_PARAMETERS[cls] = names
    return _FORWARD_PARAMETERS[cls]


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model``'s forward takes ``logits_to_keep`` (Hugging Face causal LMs do)."""
    return "logits_to_keep" in forward_parameters(model)


def kept_positions(labels: Tensor) -> int:
    """How many trailing positions :func:`response_logits` keeps for ``labels``.

    :func:`response_window` while :data:`LOGITS_WINDOW` is on, else every position ``T``.
    """
    return response_window(labels) if LOGITS_WINDOW else labels.shape[-1]


def response_logits(
    model: nn.Module, batch: dict[str, Tensor], keep: int | None = None
) -> tuple[Tensor, Tensor]:
    """Logits of the last ``keep`` positions and the matching labels slice ``labels[:, T-keep:]``.

    ``keep`` defaults to :func:`kept_positions` (the response window). ``token_losses`` of the
    returned pair gives the same per-token losses for every counted token as ``token_losses`` of
    the full logits and labels, without the ``T - keep`` leading columns, where nothing is
    counted. The model runs only those positions through its ``lm_head`` when it accepts
    ``logits_to_keep``; otherwise its full logits are sliced (a view: same result, no saving).
    """
    labels = batch["labels"]
    length = labels.shape[-1]
    keep = kept_positions(labels) if keep is None else keep
    if keep < length and accepts_logits_to_keep(model):
        logits = forward(model, batch, logits_to_keep=keep).logits
    else:
        logits = forward(model, batch).logits
    if logits.shape[1] != keep:
        logits = logits[:, length - keep :]
    return logits, labels[:, length - keep :]


def token_losses(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Shifted per-token cross-entropy ``[B, T-1]`` (float32) and the mask of counted positions.

    Entry ``[b, t]`` is the loss of predicting ``labels[b, t + 1]`` from ``logits[b, t]``; it is 0
    where that label is ``-100``. Only the counted positions go through the float32 softmax
    (prompts can be most of a batch); the result is differentiable with respect to ``logits``.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = logits[:, :-1][mask].float()  # [N, V]: a copy of the counted rows only
    ce = F.cross_entropy(picked, targets[mask], reduction="none")
    return ce.new_zeros(mask.shape).index_put((mask,), ce), mask


def sample_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over each sample's counted tokens, ``[B]`` (``nan`` if none counts)."""
    ce, mask = token_losses(logits, labels)
    return ce.sum(-1) / _counts(mask)


@dataclass(frozen=True)
class ResponseLoss:
    """The next-token cross-entropy of a batch's response tokens (see :func:`response_loss`).

    ``tokens[b, t]`` (float32, ``[B, W-1]``) is the loss of the label in column
    ``start + t + 1`` of the batch, predicted by the logits at column ``start + t``; it is 0
    where ``mask`` (bool, same shape) is False: a prompt token, padding, or a token dropped by a
    token mask. Every counted label of the batch except one in column 0 (which nothing predicts)
    lies inside the window. Tensors stay on the model's device and keep their autograd graph.
    """

    tokens: Tensor
    mask: Tensor
    start: int

    @property
    def count(self) -> Tensor:
        """Counted tokens per sample, ``[B]`` int64."""
        return self.mask.sum(-1)

    @property
    def sum(self) -> Tensor:
        """Summed loss per sample, ``[B]`` float32."""
        return self.tokens.sum(-1)

    @property
    def mean(self) -> Tensor:
        """Mean loss per sample over its counted tokens, ``[B]`` float32; ``nan`` if none."""
        return self.sum / _counts(self.mask)

    @property
    def total(self) -> Tensor:
        """The summed loss of every counted token of the batch (a scalar): divided by the
        number of tokens of an optimizer step, it is the fine-tune's objective."""
        return self.tokens.sum()


def response_loss(
    model: nn.Module, batch: dict[str, Tensor], keep: int | None = None
) -> ResponseLoss:
    """The loss of ``model`` on the response tokens of a collated ``batch``.

    Causal shift (the logits at ``t`` predict label ``t + 1``), labels ``-100`` not counted,
    logits only over the response window (:func:`response_logits`; ``keep`` overrides its
    length), per-token losses in float32. The model runs as it is: the caller chooses train or
    eval mode and whether gradients flow (scorers use :func:`eval_mode` and
    ``torch.inference_mode``; the fine-tune backpropagates ``total``).
    """
    logits, labels = response_logits(model, batch, keep)
    tokens, mask = token_losses(logits, labels)
    return ResponseLoss(tokens, mask, batch["labels"].shape[-1] - labels.shape[-1])


@register_output(
    "loss", version=2, description="mean token loss over the response"
)  # 2: one response-window loss for training, scoring and token scores
def loss_batch(model: nn.Module, batch: dict[str, Tensor], keep: int | None = None) -> Tensor:
    """Per-sample mean loss over response tokens, float64 on the CPU, shape ``[B]``.

    ``keep``: the response window when the caller knows it (see :func:`response_logits`)."""
    with torch.inference_mode(), eval_mode(model):
        losses = response_loss(model, batch, keep).mean
    return as_output(losses)


@register_output(
    "el2n", version=2, description="mean L2 norm of softmax minus one-hot over the response"
)
def el2n_batch(model: nn.Module, batch: dict[str, Tensor], keep: int | None = None) -> Tensor:
    """Per-sample EL2N: mean over response tokens of ``||softmax(z_t) - onehot(y_t)||_2``.

    ``z_t`` are the logits that *predict* token ``y_t`` (shifted by one position), and the error
    vector uses probabilities, as the EL2N paper (Paul et al., 2021) defines it. Note that the
    authors' public code for LLM fine-tuning compares position ``t`` with label ``t`` and uses raw
    logits; we follow the paper's definition instead. Float64 on the CPU, shape ``[B]``; ``nan``
    for a sample with no response token. ``keep`` as in :func:`loss_batch`.
    """
    with torch.inference_mode(), eval_mode(model):
        logits, labels = response_logits(model, batch, keep)
        mask = labels[:, 1:] != IGNORE_INDEX
        # Only the counted positions: a [N, V] softmax rather than [B, T, V]. Each vocabulary-
        # wide tensor is dropped as soon as the next one exists, so at most two are alive.
        z = logits[:, :-1][mask].float()
        del logits
        y = labels[:, 1:][mask]
        p = z.softmax(-1)
        del z
        p_y = p.gather(-1, y[:, None]).squeeze(-1)
        # sum(p^2), squaring in place: p is not needed again, and p * p would be another [N, V].
        p_sq = p.square_().sum(-1)
        # ||p - e_y||^2 = sum(p^2) - 2 p_y + 1; clamp the rounding error below 0.
        err = (p_sq - 2 * p_y + 1).clamp(min=0).sqrt()
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
