"""Healing a derived small model: distillation from its target on the task's own text (KL over
prompt and response tokens), resumable from checkpoints like a fine-tune."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batches import TokenizedData, collate, length_grouped_batches
from ..models.lora import seeded
from ..scoring.losses import eval_mode, forward, model_device
from ..train import lr_factor, warmup_steps
from ..train.loop import RunState, StepCheckpoint, checkpoint_key, save_for_stop
from ..utils import interrupt
from ..utils.errors import ModelError
from ..utils.progress import progress
from .derive_settings import DeriveSettings
from .layers import decoder_layers

logger = logging.getLogger(__name__)


def distillation_kl(
    teacher: nn.Module,
    student: nn.Module,
    data: TokenizedData,
    *,
    indices: np.ndarray | None = None,
    max_batch_tokens: int = 4096,
) -> float:
    """Mean per-token ``KL(teacher || student)`` over every real token of the rows at
    ``indices`` (all when None): prompt and response alike, padding excluded."""
    idx = np.arange(len(data)) if indices is None else np.asarray(indices, dtype=np.int64)
    total, tokens = 0.0, 0
    device = model_device(student)
    with torch.inference_mode(), eval_mode(teacher), eval_mode(student):
        for piece in length_grouped_batches(data.lengths, max_batch_tokens, indices=idx):
            batch = {k: v.to(device) for k, v in collate(data, piece).items()}
            teacher_logp = _teacher_log_probs(teacher, batch)
            total += float(_kl_sum(teacher_logp, student, batch))
            tokens += teacher_logp.shape[0]
    return total / max(tokens, 1)


def heal(
    teacher: nn.Module,
    student: nn.Module,
    data: TokenizedData,
    settings: DeriveSettings,
    *,
    max_batch_tokens: int = 4096,
    checkpoint: Path | None = None,
) -> dict[str, Any]:
    """Distil ``teacher`` into ``student`` on ``data`` for ``settings.heal_steps`` steps.

    Loss of a step: ``KL(teacher || student)`` summed over every real token of its rows (prompt
    and response: the attention mask) divided by their count. The teacher's **full** next-token
    log-probabilities are computed per micro-batch under ``no_grad``, used, and freed
    before the next micro-batch: nothing is held for all rows, so memory is that of one
    micro-batch (``max_batch_tokens`` padded tokens × vocabulary, a few float32 copies). Rows
    come from a seeded permutation, repeated as needed.

    ``full`` trains every parameter of the blocks (embeddings, final norm and LM head stay the
    target's, frozen); ``lora`` trains an adapter on the blocks and merges it into them.

    With ``checkpoint`` (a file path), the state after a step (trained weights, optimizer,
    schedule, RNG states, the losses so far) is saved there atomically every
    ``HEAL_CHECKPOINT_SECONDS``, at the end, and when a stop signal arrives inside
    :func:`speccore.utils.interrupt.interruptible`; a later call with the same student, data and
    settings resumes from that step and heals to the same weights, bit for bit, as an
    uninterrupted run (a state of another healing is ignored).

    Returns ``{"model": the healed student (plain, frozen, eval mode), "losses": each step's KL,
    "resumed_at": the step a checkpoint resumed from (0: none)}``.
    """
    from ..models.lora import attach_lora

    model: Any = student
    for p in model.parameters():
        p.requires_grad_(False)
    if settings.heal_mode == "lora":
        from ..config import LoraSettings

        lora = LoraSettings(r=settings.heal_lora_r, alpha=2 * settings.heal_lora_r, dropout=0.0)
        model = attach_lora(student, lora, seed=settings.seed)
    else:
        for p in decoder_layers(model).parameters():
            p.requires_grad_(True)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    run = _distil(teacher, model, named, data, settings, max_batch_tokens, checkpoint)
    if settings.heal_mode == "lora":
        model = model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return {"model": model, "losses": run.losses, "resumed_at": run.resumed_at}


#: How often a healing saves its state (seconds): a full-parameter state is the kept blocks'
#: weights and two AdamW moments (about 0.4 GB for Gemma-3-270M's third), so not every step;
#: a hard kill (SIGKILL, power loss) loses at most this much.
HEAL_CHECKPOINT_SECONDS = 120.0


@dataclass
class _HealRun(RunState):
    resumed_at: int = 0  # the step a checkpoint resumed from


def _distil(
    teacher: nn.Module,
    student: nn.Module,
    named: list[tuple[str, nn.Parameter]],
    data: TokenizedData,
    settings: DeriveSettings,
    max_batch_tokens: int,
    checkpoint: Path | None,
) -> _HealRun:
    """The heal loop (resumable from ``checkpoint``); the run with each step's mean KL."""
    steps = settings.heal_steps
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=settings.heal_lr, weight_decay=0.0)
    scheduler = _warmup_cosine(optimizer, steps)
    run = _HealRun(steps)
    saver = None
    if checkpoint is not None:
        key = checkpoint_key(named, data, settings, max_batch_tokens)
        saver = StepCheckpoint(checkpoint, key, None, HEAL_CHECKPOINT_SECONDS, label="heal")
    student.train()
    try:
        with seeded(settings.seed, student), eval_mode(teacher):
            if saver is not None:
                saver.load(student, named, optimizer, scheduler, run)
                run.resumed_at = run.step
            plan = _heal_rows(len(data), settings)[run.step :]
            bar = progress(plan, desc="heal", unit="step", initial=run.step, total=steps)
            for rows in bar:
                loss = _heal_step(teacher, student, data, rows, max_batch_tokens)
                if not math.isfinite(loss):
                    raise ModelError(
                        f"healing loss became {loss} at step {run.step}: lower --heal-lr"
                    )
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                run.step += 1
                run.losses.append(loss)
                bar.set_postfix(kl=f"{loss:.3f}", refresh=False)
                logger.debug("heal step %d: KL %.4f", run.step, loss)
                if saver is not None:
                    saver.maybe_save(named, optimizer, scheduler, run)
                interrupt.stop_point(
                    lambda: save_for_stop(saver, named, optimizer, scheduler, run), steps, "steps"
                )
            if saver is not None:  # a crash before the folder is published keeps the healing
                saver.save(named, optimizer, scheduler, run)
    except interrupt.Interrupted as e:
        e.update(0 if saver is None else saver.saved_step, steps, "steps")
        raise
    finally:
        student.eval()
    return run


def _heal_step(
    teacher: nn.Module,
    student: nn.Module,
    data: TokenizedData,
    rows: np.ndarray,
    max_batch_tokens: int,
) -> float:
    """Accumulate the gradient of one step's mean per-token KL over ``rows``; that KL."""
    device = model_device(student)
    pieces = length_grouped_batches(data.lengths, max_batch_tokens, indices=rows)
    batches = [collate(data, piece) for piece in pieces]
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    total = 0.0
    for cpu_batch in batches:
        batch = {k: v.to(device) for k, v in cpu_batch.items()}
        # no_grad, not inference_mode: the KL's backward reads the teacher's log-probs.
        with torch.no_grad():
            teacher_logp = _teacher_log_probs(teacher, batch)
        kl = _kl_sum(teacher_logp, student, batch)
        del teacher_logp
        (kl / n_tokens).backward()
        total += float(kl.detach())
    return total / n_tokens


def _warmup_cosine(optimizer: torch.optim.Optimizer, steps: int) -> Any:
    """The fine-tune's schedule (:func:`~speccore.train.lr_factor`): linear warm-up over the
    first 10 % of the steps (at least one), then cosine decay towards 0."""
    warmup = max(1, warmup_steps(steps, 0.1))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps, warmup))


def _heal_rows(n: int, settings: DeriveSettings) -> list[np.ndarray]:
    """Rows of every heal step: seeded permutations of all rows, one after another."""
    rng = np.random.default_rng(settings.seed)
    size = min(settings.heal_batch_size, n)
    order = np.zeros(0, dtype=np.int64)
    batches = []
    for _ in range(settings.heal_steps):
        if len(order) < size:
            order = np.concatenate([order, rng.permutation(n)])
        batches.append(order[:size])
        order = order[size:]
    return batches


def _teacher_log_probs(teacher: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Float32 log-probabilities ``[N, V]`` of the teacher at the batch's real tokens."""
    logits = forward(teacher, batch).logits
    mask = batch["attention_mask"].bool()
    return F.log_softmax(logits[mask].float(), dim=-1)


def _kl_sum(teacher_logp: Tensor, student: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """``sum_t KL(p_teacher,t || p_student,t)`` over the batch's real tokens (differentiable)."""
    logits = forward(student, batch).logits
    mask = batch["attention_mask"].bool()
    student_logp = F.log_softmax(logits[mask].float(), dim=-1)
    del logits
    return F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum")
