"""``--dry-run``: load the models, time a few batches, estimate the whole run, write nothing.

Before a long job, the dry run loads the models the method needs and tokenises the data (as the
run would), then times a few length-grouped batches of every kind of model work the method
does: scoring (the run's score function on the model's adapter), a LoRA forward + backward for
the fine-tunes, embeddings for D2. Each kind's seconds per padded token, times the padded tokens
the run will process (computed exactly from the run's own batch plans), gives the stage's
estimate. Nothing is tuned, cached or written; peak memory is that of this process, which holds
the same models and the largest batches of the run.

The estimate assumes nothing is cached yet: a rerun that reuses cached adapters or scores takes
less.
"""

from __future__ import annotations

import logging
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import SelectConfig, coreset_size
from ..data.batches import TokenizedData, collate, length_grouped_batches
from ..selection.base import Work

if TYPE_CHECKING:
    import datasets
    import torch

    from ..selection import Selection
    from .provider import ModelProvider
    from .slot import ModelSlot

logger = logging.getLogger(__name__)

PROBE_BATCHES = 2


@dataclass
class StageEstimate:
    """A stage's work and its estimated wall time."""

    stage: str
    model: str
    kind: str
    samples: int
    tokens: int
    padded_tokens: int
    seconds: float


def planned_work(cfg: SelectConfig, n: int) -> list[Work]:
    """The model work ``cfg.method`` will do on ``n`` samples, stage by stage (its plan, derived
    from the work it requests: :meth:`~speccore.selection.base.SelectionMethod.plan`)."""
    from ..selection import get_method

    return get_method(cfg.method).plan(cfg, n)


def dry_run(cfg: SelectConfig, dataset: datasets.Dataset | None = None) -> dict[str, Any]:
    """Estimate tokens, time per stage and peak memory of ``select(cfg)``; write nothing.

    Returns a dict with ``stages`` (one :class:`StageEstimate` dict each), ``load_seconds``
    (measured), ``total_tokens``, ``total_seconds``, ``peak_rss_bytes``, ``peak_gpu_bytes``
    and ``dry_run_seconds``; :func:`format_estimate` turns it into a table.
    """
    from ..data import load_rows
    from .provider import ModelProvider

    start = time.perf_counter()
    if dataset is None:
        cfg.validate()
        dataset = load_rows(cfg.data, cfg.split)
    n = len(dataset)
    budget = coreset_size(n, cfg.prune_rate)
    provider = ModelProvider(cfg, dataset)
    _reset_gpu_peak()
    loads: dict[str, float] = {}
    from ..models.load import GpuMemoryByStage

    memory = GpuMemoryByStage()
    stages = []
    try:
        for work in planned_work(cfg, n):
            with memory.stage(work.stage):
                stages.append(_estimate(provider, work, loads))
    finally:
        provider.close()
    load_seconds = sum(loads.values())
    estimate = {
        "method": cfg.method,
        "n_samples": n,
        "budget": budget,
        "device": _devices(provider),
        "stages": [asdict(s) for s in stages],
        "load_seconds": {role: round(t, 3) for role, t in loads.items()},
        "total_tokens": sum(s.tokens for s in stages),
        "total_seconds": sum(s.seconds for s in stages) + load_seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_gpu_bytes": _gpu_peak(),
        "peak_gpu_bytes_by_stage": memory.peaks(),
        "dry_run_seconds": time.perf_counter() - start,
    }
    logger.info("dry run:\n%s", format_estimate(estimate))
    return estimate


def dry_run_selection(
    cfg: SelectConfig, dataset: datasets.Dataset, budget: int | None = None
) -> Selection:
    """The dry run as an empty :class:`Selection` whose ``info["dry_run"]`` holds the estimate
    (what ``select`` returns for ``dry_run=True``)."""
    from ..selection import Selection

    estimate = dry_run(cfg, dataset)
    return Selection(
        method=cfg.method,
        indices=np.zeros(0, dtype=np.int64),
        n_total=len(dataset),
        budget=estimate["budget"] if budget is None else budget,
        info={"dry_run": estimate},
        config=cfg.to_dict(),
    )


# --- measuring ----------------------------------------------------------------------------


def _estimate(provider: ModelProvider, work: Work, loads: dict[str, float]) -> StageEstimate:
    """Load the stage's model (timed once per model), time a few batches, scale up."""
    slot = provider.slot(work.role)
    if work.role not in loads:
        t0 = time.perf_counter()
        _ = slot.data  # load + tokenise, as the run does
        _ = slot.peft
        loads[work.role] = time.perf_counter() - t0
    data, cfg = slot.data, provider.config
    if work.kind == "train":
        pieces = training_pieces(data, cfg, work.epochs, slot.batch_tokens)
        rate = _seconds_per_token(slot, "train", _probes(data, pieces))
    else:
        pieces = length_grouped_batches(data.lengths, slot.batch_tokens)
        rate = _seconds_per_token(slot, work.kind, _probes(data, pieces))
    tokens, padded = token_counts(data, pieces)
    samples = sum(len(p) for p in pieces)
    if work.samples is not None:  # a random subset: scale by its share of the samples
        share = work.samples / max(1, samples)
        samples, tokens, padded = work.samples, round(tokens * share), round(padded * share)
    logger.info(
        "dry run: %s: %.0f padded tokens/s on %s", work.stage, 1 / max(rate, 1e-12), work.role
    )
    return StageEstimate(work.stage, work.role, work.kind, samples, tokens, padded, padded * rate)


def training_pieces(
    data: TokenizedData, cfg: SelectConfig, epochs: float, max_batch_tokens: int
) -> list[np.ndarray]:
    """Every forward pass of the fine-tune (its batches split by ``max_batch_tokens``)."""
    from ..train.loop import forward_pieces

    return forward_pieces(data, cfg.train_settings(epochs), max_batch_tokens)


def token_counts(data: TokenizedData, batches: list[np.ndarray]) -> tuple[int, int]:
    """(real tokens, padded tokens) of a list of batches."""
    lengths = data.lengths
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(len(b) * int(lengths[b].max()) for b in batches if len(b))
    return real, padded


def _probes(data: TokenizedData, batches: list[np.ndarray]) -> list[np.ndarray]:
    """The median-sized and the largest batch (the largest also sets the memory peak)."""
    lengths = data.lengths  # a property that rebuilds the array: read it once
    padded = [len(b) * int(lengths[b].max()) for b in batches if len(b)]
    if not padded:
        return []
    order = np.argsort(padded, kind="stable")
    picks = {int(order[len(order) // 2]), int(order[-1])}
    return [batches[i] for i in sorted(picks)][:PROBE_BATCHES]


def _seconds_per_token(slot: ModelSlot, kind: str, probes: list[np.ndarray]) -> float:
    """Seconds per padded token of ``kind`` on ``slot``'s model, after a one-sample warm-up."""
    model = slot.use_fresh()
    step = _step_function(kind)
    if not probes:
        return 0.0
    device = _model_device(model)
    step(model, _on(collate(slot.data, probes[0][:1]), device))  # warm-up: lazy init, caches
    seconds = tokens = 0.0
    for batch in probes:
        tensors = _on(collate(slot.data, batch), device)
        t0 = time.perf_counter()
        step(model, tensors)
        _sync(device)
        seconds += time.perf_counter() - t0
        tokens += tensors["input_ids"].numel()
    return seconds / max(tokens, 1.0)


def _step_function(kind: str) -> Callable[[Any, dict[str, torch.Tensor]], Any]:
    """A fine-tune step, or one batch of any registered output (unknown: a clear error)."""
    if kind == "train":
        return _train_step
    from ..scoring.outputs import batch_function

    return batch_function(kind)


def _train_step(model: Any, batch: dict[str, torch.Tensor]) -> None:
    """A fine-tune's forward and backward (train mode, dropout on), then the gradients are
    dropped: no optimizer step, so the adapter is unchanged."""
    from ..scoring.losses import response_loss

    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    try:
        # The fine-tune's own loss (logits over the response window only).
        loss = response_loss(model, batch)
        if bool(loss.mask.any()):
            (loss.total / loss.mask.sum()).backward()
    finally:
        model.eval()
        for p in params:
            p.grad = None


# --- devices and memory -------------------------------------------------------------------


def _model_device(model: Any) -> torch.device:
    from ..scoring.losses import model_device

    return model_device(model)


def _on(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _devices(provider: ModelProvider) -> str:
    slots = [s for s in provider.loaded_slots if s.is_loaded]
    kinds = sorted({str(_model_device(s.loaded.model)) for s in slots})
    return ", ".join(kinds) or "none"


def _reset_gpu_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak() -> int | None:
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated())


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


# --- the table ----------------------------------------------------------------------------


def format_estimate(estimate: dict[str, Any]) -> str:
    """The estimate as a short table (what ``speccore select --dry-run`` prints)."""
    head = (
        f"dry run: {estimate['method']} on {estimate['n_samples']} samples "
        f"(keeps {estimate['budget']}), device {estimate['device']}"
    )
    by_stage = estimate.get("peak_gpu_bytes_by_stage") or {}
    gpu_head = f" {'GPU peak':>10s}" if by_stage else ""
    lines = [
        head,
        f"{'stage':26s} {'model':6s} {'samples':>8s} {'tokens':>11s} {'time':>9s}{gpu_head}",
    ]
    for s in estimate["stages"]:
        peak = by_stage.get(s["stage"])
        gpu = f" {gib(peak):>10s}" if by_stage and peak is not None else ""
        lines.append(
            f"{s['stage']:26s} {s['model']:6s} {s['samples']:8d} {s['tokens']:11,d} "
            f"{duration(s['seconds']):>9s}{gpu}"
        )
    lines.append(
        f"{'model load + tokenise':26s} {'':6s} {'':8s} {'':11s} "
        f"{duration(sum(estimate['load_seconds'].values())):>9s}"
    )
    lines.append(
        f"{'total (estimated)':26s} {'':6s} {'':8s} {estimate['total_tokens']:11,d} "
        f"{duration(estimate['total_seconds']):>9s}"
    )
    gpu = estimate["peak_gpu_bytes"]
    memory = f"peak memory: {gib(estimate['peak_rss_bytes'])} RAM"
    lines.append(memory + (f", {gib(gpu)} GPU" if gpu is not None else ""))
    lines.append("(assumes nothing is cached; no coreset written)")
    return "\n".join(lines)


def duration(seconds: float) -> str:
    """``42 s``, ``3m 05s``, ``2h 10m``."""
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes = math.floor(seconds / 60)
    if minutes < 60:
        return f"{minutes}m {math.floor(seconds - 60 * minutes):02d}s"
    return f"{minutes // 60}h {minutes % 60:02d}m"


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


__all__ = [
    "StageEstimate",
    "Work",
    "dry_run",
    "dry_run_selection",
    "format_estimate",
    "planned_work",
]
