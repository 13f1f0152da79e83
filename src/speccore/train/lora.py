"""LoRA fine-tuning: AdamW, linear warm-up then cosine decay, gradient accumulation and clipping.

The loss of one optimizer step is the mean cross-entropy over every response token of the step
(all its accumulated batches together): a long response counts per token, as in Hugging Face's
Trainer. Splitting a batch into smaller pieces (``max_batch_tokens``) therefore does not change
what is learned, only the memory it takes.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import TrainSettings
from ..data.tokenized import IGNORE_INDEX, TokenizedData, collate, length_grouped_batches
from ..errors import ConfigError, DataError, ModelError
from ..models.lora import seeded
from ..scoring.losses import accepts_logits_to_keep, kept_positions

logger = logging.getLogger(__name__)


def finetune(
    model: Any,
    data: TokenizedData,
    settings: TrainSettings,
    *,
    max_batch_tokens: int | None = None,
    desc: str = "fine-tune",
) -> dict[str, float]:
    """Fine-tune the trainable (LoRA) parameters of ``model`` on ``data``; returns statistics.

    Each epoch shuffles the samples with seed ``settings.seed + epoch`` and cuts them into
    batches of ``batch_size``; ``grad_accum`` batches make one optimizer step. Fractional
    ``epochs`` run that share of an epoch's batches. ``max_batch_tokens`` caps a forward pass's
    padded size by splitting a batch (same result, less memory). Dropout is seeded too, so the
    same settings give the same adapter bit for bit on the CPU. The model is left in eval mode.

    Returns ``steps``, ``epochs``, ``samples``, ``tokens``, ``final_loss``, ``mean_loss``,
    ``seconds`` and ``tokens_per_s``.
    """
    _validate(settings, max_batch_tokens)
    if settings.epochs == 0:
        return _stats(0, settings.epochs, 0, 0, [], 0.0)
    if len(data) == 0:
        raise DataError("no samples to fine-tune on: the training data is empty")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ModelError("model has no trainable parameters: attach a LoRA adapter first")
    plan = plan_steps(len(data), settings)
    optimizer = torch.optim.AdamW(
        params, lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    warmup = warmup_steps(len(plan), settings.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, len(plan), warmup)
    )
    device = next(model.parameters()).device
    losses: list[float] = []
    samples = tokens = 0
    start = time.perf_counter()
    model.train()
    try:
        with seeded(settings.seed, model), tqdm(total=len(plan), desc=desc, unit="step") as bar:
            for step, batches in enumerate(plan):
                chunks = _collate_step(data, batches, max_batch_tokens)
                loss = _train_step(model, chunks, device, params, settings.max_grad_norm)
                if loss is not None:
                    if not math.isfinite(loss):
                        raise ModelError(
                            f"fine-tuning loss became {loss} at step {step}: lower "
                            "--learning-rate or use --dtype float32"
                        )
                    optimizer.step()
                    losses.append(loss)
                    bar.set_postfix(loss=f"{loss:.4f}")
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                samples += sum(len(b) for b in batches)
                tokens += sum(int(c["attention_mask"].sum()) for c in chunks)
                bar.update(1)
    finally:
        model.eval()
    stats = _stats(len(plan), settings.epochs, samples, tokens, losses, time.perf_counter() - start)
    logger.info("%s: %s", desc, stats)
    return stats


def plan_steps(n: int, settings: TrainSettings) -> list[list[np.ndarray]]:
    """The sample indices of every batch, grouped by optimizer step.

    ``ceil(epochs · batches_per_epoch)`` batches in all, epoch ``e`` drawn from a permutation
    seeded with ``seed + e``; every ``grad_accum`` consecutive batches form one step.
    """
    per_epoch = math.ceil(n / settings.batch_size)
    total = max(1, math.ceil(settings.epochs * per_epoch - 1e-9))
    batches: list[np.ndarray] = []
    epoch = 0
    while len(batches) < total:
        order = np.random.default_rng(settings.seed + epoch).permutation(n)
        for start in range(0, n, settings.batch_size):
            batches.append(order[start : start + settings.batch_size])
        epoch += 1
    batches = batches[:total]
    k = settings.grad_accum
    return [batches[i : i + k] for i in range(0, total, k)]


def warmup_steps(total: int, warmup_ratio: float) -> int:
    """Warm-up length in optimizer steps: ``ceil(warmup_ratio · total)``."""
    return math.ceil(warmup_ratio * total)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based).

    Rises linearly over the ``warmup`` steps (``1/(warmup+1)`` at step 0, so no step is wasted at
    rate 0), is 1 at step ``warmup``, then follows a cosine down towards 0 at step ``total``.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _collate_step(
    data: TokenizedData, batches: list[np.ndarray], max_batch_tokens: int | None
) -> list[dict[str, torch.Tensor]]:
    """Pad the step's batches, split into pieces of at most ``max_batch_tokens`` padded tokens."""
    chunks: list[dict[str, torch.Tensor]] = []
    lengths = data.lengths
    for batch in batches:
        if max_batch_tokens is None:
            pieces = [batch]
        else:
            pieces = length_grouped_batches(lengths, max_batch_tokens, indices=batch)
        chunks += [collate(data, piece) for piece in pieces]
    return chunks


def _train_step(
    model: Any,
    chunks: list[dict[str, torch.Tensor]],
    device: torch.device,
    params: list[torch.nn.Parameter],
    max_grad_norm: float,
) -> float | None:
    """Forward and backward every chunk, normalised by the step's response tokens; clip.

    Returns the step's mean token loss, or None when the step has no response token to learn.
    """
    n_tokens = sum(int((c["labels"][:, 1:] != IGNORE_INDEX).sum()) for c in chunks)
    if n_tokens == 0:
        logger.debug("skipping a step without response tokens")
        return None
    total = torch.zeros((), device=device)
    for chunk in chunks:
        if not (chunk["labels"][:, 1:] != IGNORE_INDEX).any():
            continue  # a piece of prompts only: nothing to learn, skip its forward pass
        loss_sum = _loss_sum(model, {k: v.to(device) for k, v in chunk.items()})
        (loss_sum / n_tokens).backward()
        total += loss_sum.detach()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    return float(total) / n_tokens


def _loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the response tokens of one padded batch.

    Logits (and their gradient) are computed only over the response window, the trailing
    positions that hold every response token of the batch, when the model accepts
    ``logits_to_keep``: with a large vocabulary the lm_head outweighs the rest of the network.
    """
    labels = batch["labels"]
    length = labels.shape[1]
    keep = kept_positions(labels)
    extra = {"logits_to_keep": keep} if keep < length and accepts_logits_to_keep(model) else {}
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        use_cache=False,
        **extra,
    ).logits
    # The logits at window position t predict labels[:, length - keep + t + 1]; a model without
    # logits_to_keep returned every position, so align it by slicing (a view).
    logits = logits[:, logits.shape[1] - keep :]
    targets = labels[:, length - keep + 1 :]
    keep_mask = targets != IGNORE_INDEX
    # Only response positions go through the float32 softmax: prompts can be most of a batch.
    picked = logits[:, :-1][keep_mask].float()
    return F.cross_entropy(picked, targets[keep_mask], reduction="sum")


def _validate(settings: TrainSettings, max_batch_tokens: int | None) -> None:
    if settings.epochs < 0 or not math.isfinite(settings.epochs):
        raise ConfigError(f"fine-tune epochs must be >= 0, got {settings.epochs}")
    if settings.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {settings.batch_size}")
    if settings.grad_accum < 1:
        raise ConfigError(f"--grad-accum must be >= 1, got {settings.grad_accum}")
    if settings.learning_rate <= 0:
        raise ConfigError(f"--learning-rate must be > 0, got {settings.learning_rate}")
    if not 0 <= settings.warmup_ratio <= 1:
        raise ConfigError(f"--warmup-ratio must be in [0, 1], got {settings.warmup_ratio}")
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise ConfigError(f"--max-batch-tokens must be >= 1, got {max_batch_tokens}")


def _stats(
    steps: int, epochs: float, samples: int, tokens: int, losses: list[float], seconds: float
) -> dict[str, float]:
    return {
        "steps": float(steps),
        "epochs": float(epochs),
        "samples": float(samples),
        "tokens": float(tokens),
        "final_loss": losses[-1] if losses else float("nan"),
        "mean_loss": float(np.mean(losses)) if losses else float("nan"),
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
    }
