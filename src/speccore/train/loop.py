"""LoRA fine-tuning: AdamW, linear warm-up then cosine decay, gradient accumulation and clipping.

The loss of one optimizer step is the mean cross-entropy over every response token of the step
(all its accumulated batches together): the summed token losses of the step divided by its
response tokens, so a long response counts per token, as in Hugging Face's Trainer, and the
shape of the batches does not change the objective. Splitting a batch into smaller pieces
(``max_batch_tokens``) therefore does not change what is learned, only the memory it takes.

Batches are cut by tokens, grouped by length (:mod:`speccore.train.batching`), or by rows
(``batching="rows"``). The loop never waits for the device: the loss stays there and is read
every :data:`LOSS_EVERY` steps, response windows come from the host's labels, copies are pinned
and non-blocking, AdamW is fused on CUDA, and a half-precision base runs its float32 adapters
under autocast (:mod:`speccore.models.speed`).
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import TrainSettings
from ..data.batches import IGNORE_INDEX, BatchLoop, TokenizedData, length_grouped_batches
from ..models.lora import seeded
from ..models.speed import adamw, adapter_autocast
from ..scoring.losses import kept_positions, response_loss
from ..utils import interrupt
from ..utils.errors import ConfigError, DataError, ModelError
from ..utils.io import atomic_path, fingerprint
from .batching import BATCHINGS, batch_budget, device_batch_tokens, plan_batches

logger = logging.getLogger(__name__)

#: The file :func:`finetune` keeps its state in, inside its ``checkpoint`` folder.
CHECKPOINT_FILE = "finetune_state.pt"

#: Optimizer steps between two reads of the loss on the host (each read waits for the device).
LOSS_EVERY = 16


def finetune(
    model: Any,
    data: TokenizedData,
    settings: TrainSettings,
    *,
    max_batch_tokens: int | None = None,
    desc: str = "fine-tune",
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_steps: int | None = None,
    checkpoint_seconds: float | None = 30.0,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Fine-tune the trainable (LoRA) parameters of ``model`` on ``data``; returns statistics.

    Each epoch shuffles the samples with seed ``settings.seed + epoch`` and cuts them into
    batches (:func:`plan_steps`: by tokens, grouped by length, or by rows); ``grad_accum``
    batches make one optimizer step. Fractional ``epochs`` run that share of an epoch's batches.
    ``max_batch_tokens`` caps a forward pass's padded size by splitting a batch (same result,
    less memory); None: no cap on the CPU, on CUDA one sized from free device memory
    (:func:`~speccore.train.batching.device_batch_tokens`). Dropout is seeded too, so the same
    settings give the same adapter bit for bit on the CPU. The model is left in eval mode.

    With ``checkpoint`` (a folder), the state after an optimizer step (trainable weights,
    optimizer and scheduler, the step, the RNG states of torch, numpy and Python, the losses so
    far) is saved atomically to ``checkpoint/finetune_state.pt`` every ``checkpoint_steps``
    steps and/or every ``checkpoint_seconds`` seconds (None: not by that measure), at the end,
    and when a stop signal arrives inside :func:`speccore.utils.interrupt.interruptible` (then
    :class:`speccore.utils.interrupt.Interrupted` is raised). A later call with the same model
    (initial trainable weights), data and settings resumes from that step and gives the same
    adapter, bit for bit, as an uninterrupted run; a state made for another fine-tune is
    ignored. The folder does not identify the base model: use one per model. It is never
    deleted here.

    ``on_step(k)`` is called after optimizer step k (1-based) is applied, before that step's
    checkpoint is saved, so a resumed run calls it again for every step it redoes (the
    provider saves S2L's LoRA snapshots with it). It must not change the model or draw from
    an RNG.

    Returns ``steps``, ``epochs``, ``samples``, ``tokens``, ``padded_tokens`` (the forward
    passes' padded size), ``batch_tokens`` (the token budget, 0 for row batching),
    ``final_loss``, ``mean_loss``, ``seconds`` and ``tokens_per_s`` (real tokens).
    """
    _validate(settings, max_batch_tokens, checkpoint_steps, checkpoint_seconds)
    if settings.epochs == 0:
        return _stats(0, settings.epochs, RunState(0), 0, 0.0)
    if len(data) == 0:
        raise DataError("no samples to fine-tune on: the training data is empty")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ModelError("model has no trainable parameters: attach a LoRA adapter first")
    params = [p for _, p in named]
    plan = plan_steps(data.lengths, settings)
    cap = max_batch_tokens if max_batch_tokens is not None else device_batch_tokens(model)
    steps = _Steps.of(data, plan, cap)
    optimizer = adamw(params, settings.learning_rate, settings.weight_decay)
    warmup = warmup_steps(len(plan), settings.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, len(plan), warmup)
    )
    device = next(model.parameters()).device
    run = RunState(len(plan))
    saver = None
    if checkpoint is not None:
        key = checkpoint_key(named, data, settings, max_batch_tokens)
        saver = StepCheckpoint(
            Path(checkpoint) / CHECKPOINT_FILE, key, checkpoint_steps, checkpoint_seconds
        )
    lengths = data.lengths
    start = time.perf_counter()
    caller_rng = _host_rng_state()  # numpy and Python: restored when done, as seeded() does
    model.train()
    try:
        with seeded(settings.seed, model):
            if saver is not None:
                saver.load(model, named, optimizer, scheduler, run)
            done = frozenset(np.flatnonzero(steps.step_of < run.step).tolist())
            with BatchLoop(
                data,
                steps.pieces,
                device=device,
                skip=done,
                desc=desc,
                unit="sample",
                window=kept_positions,
            ) as loop:
                for batch in loop:
                    step = int(steps.step_of[batch.number])
                    run.count(batch.samples, lengths)
                    if steps.learned[batch.samples].any():  # else prompts only: no forward pass
                        with adapter_autocast(model):
                            loss = response_loss(model, batch.tensors, batch.keep).total
                        (loss / int(steps.tokens[step])).backward()
                        run.add_loss(loss.detach())
                    if steps.last_piece[step] == batch.number:
                        _finish_step(
                            optimizer, scheduler, params, settings, run, int(steps.tokens[step])
                        )
                        if on_step is not None:
                            on_step(run.step)
                        if run.step % LOSS_EVERY == 0 and run.read_losses():
                            loop.set_postfix(loss=f"{run.losses[-1]:.4f}")
                        if saver is not None:
                            saver.maybe_save(named, optimizer, scheduler, run)
                        interrupt.stop_point(
                            lambda: save_for_stop(saver, named, optimizer, scheduler, run),
                            len(plan),
                            "steps",
                        )
            if saver is not None:
                saver.save(named, optimizer, scheduler, run)
    except interrupt.Interrupted as e:
        e.update(0 if saver is None else saver.saved_step, len(plan), "steps")
        raise
    finally:
        model.eval()
        _set_host_rng_state(caller_rng)
    run.read_losses()
    budget = batch_budget(lengths, settings) if settings.batching == "tokens" else 0
    stats = _stats(len(plan), settings.epochs, run, budget, time.perf_counter() - start)
    logger.info("%s: %s", desc, stats)
    return stats


def plan_steps(lengths: np.ndarray | int, settings: TrainSettings) -> list[list[np.ndarray]]:
    """The sample indices of every batch, grouped by optimizer step.

    Token batching (the default) needs the rows' ``lengths``; row batching takes their number
    too: ``ceil(epochs · batches_per_epoch)`` batches, epoch ``e`` a permutation seeded with
    ``seed + e``. Every ``grad_accum`` consecutive batches form one step. See
    :mod:`speccore.train.batching`.
    """
    return plan_batches(lengths, settings)


def forward_pieces(
    data: TokenizedData, settings: TrainSettings, max_batch_tokens: int
) -> list[np.ndarray]:
    """Every forward pass of a fine-tune of ``data``: its planned batches, each split into
    pieces of at most ``max_batch_tokens`` padded tokens (what the dry runs time and count)."""
    lengths = data.lengths
    return [
        piece
        for step in plan_steps(lengths, settings)
        for batch in step
        for piece in length_grouped_batches(lengths, max_batch_tokens, indices=batch)
    ]


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


@dataclass(frozen=True)
class _Steps:
    """Every forward pass of a fine-tune, in order, and what the optimizer steps need."""

    pieces: list[np.ndarray]  # sample indices of each forward pass
    step_of: np.ndarray  # the optimizer step of each piece
    last_piece: dict[int, int]  # step -> the number of its last piece
    learned: np.ndarray  # per sample: the tokens its loss learns (see _learned_tokens)
    tokens: np.ndarray  # per step: the tokens its loss learns (its mean's denominator)

    @classmethod
    def of(
        cls, data: TokenizedData, plan: list[list[np.ndarray]], max_batch_tokens: int | None
    ) -> _Steps:
        """A step's batches, split into pieces of at most ``max_batch_tokens`` padded tokens."""
        lengths = data.lengths
        pieces: list[np.ndarray] = []
        step_of: list[int] = []
        for step, batches in enumerate(plan):
            for batch in batches:
                if max_batch_tokens is None:
                    split = [batch]
                else:
                    split = length_grouped_batches(lengths, max_batch_tokens, indices=batch)
                pieces += split
                step_of += [step] * len(split)
        learned = _learned_tokens(data)
        tokens = np.zeros(len(plan), dtype=np.int64)
        np.add.at(tokens, step_of, [int(learned[p].sum()) for p in pieces])
        last_piece = {s: i for i, s in enumerate(step_of)}
        return cls(pieces, np.array(step_of, dtype=np.int64), last_piece, learned, tokens)


def _learned_tokens(data: TokenizedData) -> np.ndarray:
    """Per sample, the tokens the loss learns: counted labels (after the token mask) past
    position 0, which no logit predicts."""
    counts = np.zeros(len(data), dtype=np.int64)
    for i, labels in enumerate(data.labels):
        mask = data.token_masks[i] if data.token_masks is not None else None
        counts[i] = sum(
            1
            for t, label in enumerate(labels)
            if t > 0 and label != IGNORE_INDEX and (mask is None or mask[t])
        )
    return counts


@dataclass
class RunState:
    """What a training loop (a fine-tune, a derived model's healing) has done so far (saved
    with its checkpoint).

    Step losses stay on the device (``pending``, with each step's token count) until
    :meth:`read_losses` moves them to ``losses``: one host sync per read, not per batch."""

    n_steps: int
    step: int = 0  # optimizer steps done
    losses: list[float] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    padded: int = 0  # padded tokens of the forward passes
    step_loss: Any = 0.0  # summed token loss of the step in progress (a device tensor once set)
    pending: list[tuple[int, Any, int]] = field(default_factory=list)  # (step, loss sum, tokens)

    def count(self, samples: np.ndarray, lengths: np.ndarray) -> None:
        """Count a forward pass over ``samples`` (real and padded tokens)."""
        self.samples += len(samples)
        rows = lengths[samples]
        self.tokens += int(rows.sum())
        self.padded += len(rows) * int(rows.max()) if len(rows) else 0

    def add_loss(self, loss: Any) -> None:
        self.step_loss = self.step_loss + loss

    def read_losses(self) -> bool:
        """Move the pending step losses to the host (one sync); a non-finite one raises
        :class:`ModelError`. Whether any was moved."""
        if not self.pending:
            return False
        sums = torch.stack([torch.as_tensor(s, dtype=torch.float32) for _, s, _ in self.pending])
        values = sums.double().cpu().tolist()
        for (step, _, n), total in zip(self.pending, values, strict=True):
            loss = total / n
            if not math.isfinite(loss):
                self.pending.clear()
                raise ModelError(
                    f"fine-tuning loss became {loss} at step {step}: lower "
                    "--learning-rate or use --dtype float32"
                )
            self.losses.append(loss)
        self.pending.clear()
        return True


def _finish_step(
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    params: list[torch.nn.Parameter],
    settings: TrainSettings,
    run: RunState,
    n_tokens: int,
) -> None:
    """Clip, step the optimizer (if the step had ``n_tokens`` to learn) and the schedule."""
    step = run.step
    if n_tokens == 0:
        logger.debug("skipping a step without response tokens")
    else:
        # Checked for finiteness when read (RunState.read_losses), not here: no host sync.
        run.pending.append((step, run.step_loss, n_tokens))
        if settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    run.step, run.step_loss = step + 1, 0.0


def save_for_stop(
    saver: StepCheckpoint | None,
    named: list[tuple[str, torch.nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    run: RunState,
) -> int:
    """Save for a requested stop; the steps now on disk (0 without a checkpoint)."""
    if saver is None:
        return 0
    saver.save(named, optimizer, scheduler, run)
    return saver.saved_step


class StepCheckpoint:
    """A training loop's state file: when to write it, writing it, and resuming from it.

    Used by :func:`finetune` and by the healing of a derived model; ``key`` (see
    :func:`checkpoint_key`) says which run a state belongs to, and a state of another run is
    ignored."""

    def __init__(
        self,
        path: Path,
        key: str,
        steps: int | None,
        seconds: float | None,
        label: str = "fine-tune",
    ) -> None:
        self.path, self.key, self.label = path, key, label
        self.steps, self.seconds = steps, seconds
        self.saved_step = 0
        self.last_save = time.monotonic()

    def maybe_save(
        self,
        named: list[tuple[str, torch.nn.Parameter]],
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        run: RunState,
    ) -> None:
        by_steps = self.steps is not None and run.step - self.saved_step >= self.steps
        by_time = self.seconds is not None and time.monotonic() - self.last_save >= self.seconds
        if by_steps or by_time:
            self.save(named, optimizer, scheduler, run)

    def save(
        self,
        named: list[tuple[str, torch.nn.Parameter]],
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        run: RunState,
    ) -> None:
        if run.step == self.saved_step and self.path.exists():
            return
        run.read_losses()
        state = {
            "key": self.key,
            "step": run.step,
            "weights": {n: p.detach().cpu().clone() for n, p in named},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(named),
            "losses": list(run.losses),
            "samples": run.samples,
            "tokens": run.tokens,
            "padded": run.padded,
        }
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)
        self.saved_step = run.step
        self.last_save = time.monotonic()
        interrupt.report(run.step, run.n_steps, "steps")
        logger.debug("%s checkpoint %s: step %d", self.label, self.path, run.step)

    def load(
        self,
        model: Any,
        named: list[tuple[str, torch.nn.Parameter]],
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        run: RunState,
    ) -> None:
        """Take over a state saved by this very fine-tune, if there is one."""
        if not self.path.exists():
            return
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            key, step = str(state["key"]), int(state["step"])
        except (OSError, RuntimeError, ValueError, KeyError, EOFError) as e:
            logger.warning("ignoring unreadable %s checkpoint %s: %s", self.label, self.path, e)
            return
        if key != self.key or not 0 < step <= run.n_steps:
            logger.info("ignoring %s checkpoint %s: made for another run", self.label, self.path)
            return
        with torch.no_grad():
            for name, p in named:
                p.copy_(state["weights"][name])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], named)
        run.step, run.losses = step, [float(x) for x in state["losses"]]
        run.samples, run.tokens = int(state["samples"]), int(state["tokens"])
        run.padded = int(state.get("padded", 0))
        self.saved_step = step
        interrupt.report(step, run.n_steps, "steps")
        logger.info("resumed %s at step %d of %d from %s", self.label, step, run.n_steps, self.path)


def checkpoint_key(
    named: list[tuple[str, torch.nn.Parameter]],
    data: TokenizedData,
    settings: object,
    max_batch_tokens: int | None,
) -> str:
    """What a resumable state must match: the initial trainable weights (names, dtypes,
    values), the data with its token masks, the settings (a dataclass: every field) and the
    batching."""
    weights = [
        (n, str(p.dtype), p.detach().cpu().contiguous().view(torch.uint8).numpy()) for n, p in named
    ]
    masks = data.token_masks
    mask_fp = None if masks is None else fingerprint([np.asarray(m, np.int8) for m in masks])
    return fingerprint(
        "finetune-checkpoint",
        [(n, d) for n, d, _ in weights],
        *[w for _, _, w in weights],
        data.fingerprint(),
        mask_fp,
        vars(settings),
        max_batch_tokens,
    )


def _cuda_devices(named: list[tuple[str, torch.nn.Parameter]]) -> list[int]:
    return sorted({p.device.index or 0 for _, p in named if p.device.type == "cuda"})


def _rng_state(named: list[tuple[str, torch.nn.Parameter]]) -> dict[str, Any]:
    """Every RNG a resumed run must continue: torch (CPU, and the model's CUDA devices, which
    dropout draws from), numpy's and Python's global ones."""
    np_state: Any = np.random.get_state()  # the legacy tuple (MT19937 keys, pos, gauss)
    return {
        "torch": torch.random.get_rng_state(),
        "cuda": {d: torch.cuda.get_rng_state(d) for d in _cuda_devices(named)},
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any], named: list[tuple[str, torch.nn.Parameter]]) -> None:
    torch.random.set_rng_state(state["torch"])
    for d, s in state["cuda"].items():
        if d in _cuda_devices(named):
            torch.cuda.set_rng_state(s, d)
    _set_host_rng_state((_numpy_state(state["numpy"]), state["python"]))


def _numpy_state(saved: dict[str, Any]) -> tuple[Any, ...]:
    keys = saved["keys"].numpy().astype(np.uint32)
    return ("MT19937", keys, saved["pos"], saved["has_gauss"], saved["gauss"])


def _host_rng_state() -> tuple[Any, Any]:
    return np.random.get_state(), random.getstate()


def _set_host_rng_state(state: tuple[Any, Any]) -> None:
    np.random.set_state(state[0])
    random.setstate(state[1])


def _validate(
    settings: TrainSettings,
    max_batch_tokens: int | None,
    checkpoint_steps: int | None,
    checkpoint_seconds: float | None,
) -> None:
    if settings.epochs < 0 or not math.isfinite(settings.epochs):
        raise ConfigError(f"fine-tune epochs must be >= 0, got {settings.epochs}")
    if settings.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {settings.batch_size}")
    if settings.batching not in BATCHINGS:
        raise ConfigError(f"--batching must be one of {BATCHINGS}, got {settings.batching!r}")
    if settings.batch_tokens < 0:
        raise ConfigError(f"--batch-tokens must be >= 0 (0: auto), got {settings.batch_tokens}")
    if settings.grad_accum < 1:
        raise ConfigError(f"--grad-accum must be >= 1, got {settings.grad_accum}")
    if settings.learning_rate <= 0:
        raise ConfigError(f"--learning-rate must be > 0, got {settings.learning_rate}")
    if not 0 <= settings.warmup_ratio <= 1:
        raise ConfigError(f"--warmup-ratio must be in [0, 1], got {settings.warmup_ratio}")
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise ConfigError(f"--max-batch-tokens must be >= 1, got {max_batch_tokens}")
    if checkpoint_steps is not None and checkpoint_steps < 1:
        raise ConfigError(f"checkpoint_steps must be >= 1 or None, got {checkpoint_steps}")
    if checkpoint_seconds is not None and not checkpoint_seconds > 0:
        raise ConfigError(f"checkpoint_seconds must be > 0 or None, got {checkpoint_seconds}")


def _stats(
    steps: int, epochs: float, run: RunState, budget: int, seconds: float
) -> dict[str, float]:
    losses = run.losses
    return {
        "steps": float(steps),
        "epochs": float(epochs),
        "samples": float(run.samples),
        "tokens": float(run.tokens),
        "padded_tokens": float(run.padded),
        "batch_tokens": float(budget),
        "final_loss": losses[-1] if losses else float("nan"),
        "mean_loss": float(np.mean(losses)) if losses else float("nan"),
        "seconds": seconds,
        "tokens_per_s": run.tokens / seconds if seconds > 0 else 0.0,
    }
