"""``speccore bench CONFIG --dry-run``: the cells a run would do, each with an estimated time,
from measured per-token costs; nothing is written.

It loads the target and tokenises the data as the bench does, then measures with the machinery
of ``speccore select --dry-run`` (:mod:`speccore.run.dryrun`): seconds per padded token of a LoRA
forward + backward and of the ``loss`` score on the target, timed on the median-sized and the
largest batch. A cell's fine-tune is its coreset's share of the full data's padded tokens
(the bench's own batch plan, ``finetune.epochs`` included; the coreset's rows are not known
before selecting, so their mean length is taken to be the data's), its reference NLL the
evaluation rows' padded tokens, its generation one timed batch of prompts scaled to the rows
it generates on, each row assumed to stop after its reference's length (EOS or a stop string;
``max_new_tokens`` at most). A selection is its method's own dry run (per stage); a stage
whose result the cache keeps (a fine-tune or full scoring, under one tune seed) is charged to
the first cell that needs it, and verification to every cell. Finished cells are listed but
not charged; stale ones (other code or variant definition) are charged as new.

Not estimated: deriving a small model (``small: "derive:…"``; its selection shows "?"), and
model loads beyond the first.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import coreset_size
from ..data.batches import TokenizedData, length_grouped_batches
from ..proxies.derive import is_derive_spec
from ..run.dryrun import _probes, _seconds_per_token, duration, token_counts
from ..train.loop import forward_pieces
from .bench_config import BenchConfig
from .run import FULL, ZERO_SHOT, BenchRunner, Cell, check_settings, load_cells, plan_cells

logger = logging.getLogger(__name__)

NEW, FINISHED, STALE = "new", "finished", "stale"


@dataclass
class CellEstimate:
    """One planned cell: its status and estimated seconds per stage (None: not estimated)."""

    name: str
    status: str
    select_s: float | None = 0.0
    train_s: float = 0.0
    nll_s: float = 0.0
    generate_s: float = 0.0

    @property
    def total_s(self) -> float | None:
        if self.select_s is None:
            return None
        return self.select_s + self.train_s + self.nll_s + self.generate_s


@dataclass
class Costs:
    """Measured costs on the target: seconds per padded token of a fine-tune step and of the
    reference NLL, a generation batch's prefill and per-token step."""

    train: float
    nll: float
    prefill: float
    step: float


class _TokensOnTarget:
    """What :func:`speccore.run.dryrun._seconds_per_token` needs of a model slot: tokenised data
    and the model with a fresh LoRA."""

    def __init__(self, data: TokenizedData, model: Any) -> None:
        self.data = data
        self._model = model

    def use_fresh(self) -> Any:
        return self._model


def _slot(data: TokenizedData, model: Any) -> Any:
    """A stand-in for the model slot of ``_seconds_per_token`` (duck-typed)."""
    return _TokensOnTarget(data, model)


def estimate_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Every planned cell with its status and estimated seconds; writes nothing."""
    cfg.validate()
    cells = plan_cells(cfg)
    done = load_cells(cfg.folder) if (cfg.folder / "cells").is_dir() else {}
    check_settings(done, cfg.settings_dict(), cfg.folder, cfg.token_settings())
    runner = BenchRunner(cfg)
    stale = runner.stale(cells, done)
    status = {
        c.name: STALE if c.name in stale else FINISHED if c.name in done else NEW for c in cells
    }
    runner.data_to_write = False  # the training subset stays in memory
    start = time.perf_counter()
    costs = measure_costs(runner)
    selections = _selection_estimates(cfg, runner, [c for c in cells if status[c.name] != FINISHED])
    paid: set[tuple[Any, ...]] = set()
    out = []
    for cell in cells:
        est = _cell_estimate(cfg, runner, cell, status[cell.name], costs)
        charge = _selection_seconds(cfg, cell, selections, paid)
        if est.status != FINISHED:
            est.select_s = charge
        out.append(est)
    return {"cells": out, "measure_seconds": time.perf_counter() - start, "costs": costs}


def measure_costs(runner: BenchRunner) -> Costs:
    """Seconds per padded token of a fine-tune step and of the reference NLL on the target
    (with a fresh LoRA), and a generation batch's prefill and per-token step."""
    from ..models import attach_lora, detach_lora

    cfg = runner.cfg
    train, evaluation = runner.train_tokens, runner.eval_tokens
    peft = attach_lora(runner.base, cfg.lora, seed=0)
    try:
        train_pieces = forward_pieces(train, cfg.finetune, cfg.max_batch_tokens)
        rate_train = _seconds_per_token(_slot(train, peft), "train", _probes(train, train_pieces))
        nll_pieces = length_grouped_batches(evaluation.lengths, cfg.max_batch_tokens)
        rate_nll = _seconds_per_token(
            _slot(evaluation, peft), "loss", _probes(evaluation, nll_pieces)
        )
        prefill, step = _generation_costs(runner, peft)
    finally:
        runner._base = detach_lora(peft)
    return Costs(rate_train, rate_nll, prefill, step)


def _generation_costs(runner: BenchRunner, model: Any) -> tuple[float, float]:
    """(prefill seconds, seconds per new token) of one batch of ``generation.batch_size``
    prompts: timed at 1 and at 4 new tokens (stop strings off, so that all 4 are made)."""
    from .generate import generate

    g = runner.cfg.generation
    if runner.generate_rows == 0:
        return 0.0, 0.0
    prompts = runner.prompts[: min(g.batch_size, runner.generate_rows)]
    seconds = []
    for new in (1, 4):
        t0 = time.perf_counter()
        generate(
            model,
            runner.loaded.tokenizer,
            prompts,
            max_new_tokens=new,
            batch_size=g.batch_size,
            max_prompt_tokens=runner.cfg.prompt_budget,
            truncation_side=runner.cfg.data.truncation_side,
            desc="dry run: generate",
        )
        seconds.append(time.perf_counter() - t0)
    step = max(0.0, (seconds[1] - seconds[0]) / 3)
    return max(0.0, seconds[0] - step), step


def _cell_estimate(
    cfg: BenchConfig, runner: BenchRunner, cell: Cell, status: str, costs: Costs
) -> CellEstimate:
    est = CellEstimate(cell.name, status)
    if status == FINISHED:
        return est
    evaluation = runner.eval_tokens
    _, nll_padded = token_counts(
        evaluation, length_grouped_batches(evaluation.lengths, cfg.max_batch_tokens)
    )
    est.nll_s = nll_padded * costs.nll
    n_gen = runner.generate_rows
    if n_gen:
        answer = float(np.mean(_response_lengths(evaluation)[:n_gen]))
        steps = min(cfg.generation.max_new_tokens, math.ceil(answer) + 1)
        batches = math.ceil(n_gen / cfg.generation.batch_size)
        est.generate_s = batches * (costs.prefill + steps * costs.step)
    if cell.method != ZERO_SHOT:
        train = runner.train_tokens
        _, padded = token_counts(train, forward_pieces(train, cfg.finetune, cfg.max_batch_tokens))
        n = len(train)
        share = 1.0 if cell.method == FULL else coreset_size(n, cell.prune_rate) / max(1, n)
        est.train_s = padded * share * costs.train
    return est


def _response_lengths(data: TokenizedData) -> np.ndarray:
    return np.array([sum(1 for t in labels if t != -100) for labels in data.labels])


# --- selections ---------------------------------------------------------------------------


def _selection_estimates(
    cfg: BenchConfig, runner: BenchRunner, cells: list[Cell]
) -> dict[str, list[dict[str, Any]] | None]:
    """Per method (or variant) to run: its dry run's stages (None: a derived small model,
    not estimated)."""
    from ..run.dryrun import dry_run

    out: dict[str, list[dict[str, Any]] | None] = {}
    for cell in cells:
        if cell.method in (FULL, ZERO_SHOT) or cell.method in out:
            continue
        sel = cfg.select_config(cell.method, cell.prune_rate, cell.seed or 0, cell.token_keep)
        if sel.small and is_derive_spec(sel.small):
            out[cell.method] = None
            continue
        out[cell.method] = dry_run(sel, runner.data.train)["stages"]
    return out


def _selection_seconds(
    cfg: BenchConfig,
    cell: Cell,
    selections: dict[str, list[dict[str, Any]] | None],
    paid: set[tuple[Any, ...]],
) -> float | None:
    """The seconds of ``cell``'s selection not already paid by an earlier cell (the cache
    keeps fine-tunes and full scoring per tune seed); verification is paid by every cell."""
    if cell.method in (FULL, ZERO_SHOT):
        return 0.0
    if cell.method not in selections:  # finished: its cached stages are paid
        stages: list[dict[str, Any]] | None = []
    else:
        stages = selections[cell.method]
    if stages is None:
        return None
    sel = cfg.select_config(cell.method, cell.prune_rate, cell.seed or 0, cell.token_keep)
    total = 0.0
    for stage in stages:
        if _per_cell(stage):
            total += stage["seconds"]
            continue
        key = (stage["stage"], stage["model"], sel.small, sel.target, sel.tune_seed)
        if key not in paid:
            paid.add(key)
            total += stage["seconds"]
    return total


def _per_cell(stage: dict[str, Any]) -> bool:
    """Target scoring of a subset (STAFF's verification): it depends on the cell's seed."""
    return stage["model"] == "target" and "verification" in stage["stage"]


# --- printing -----------------------------------------------------------------------------


def format_bench_estimate(estimate: dict[str, Any]) -> str:
    """The cells as a table, then the totals (what ``speccore bench --dry-run`` prints)."""
    costs: Costs = estimate["costs"]
    lines = [
        f"{'cell':34s} {'status':8s} {'select':>8s} {'fine-tune':>9s} {'ref NLL':>8s} "
        f"{'generate':>8s} {'total':>8s}"
    ]
    todo = [c for c in estimate["cells"] if c.status != FINISHED]
    for c in estimate["cells"]:
        if c.status == FINISHED:
            lines.append(f"{c.name:34s} {c.status:8s}")
            continue
        sel = "?" if c.select_s is None else duration(c.select_s)
        total = "?" if c.total_s is None else duration(c.total_s)
        lines.append(
            f"{c.name:34s} {c.status:8s} {sel:>8s} {duration(c.train_s):>9s} "
            f"{duration(c.nll_s):>8s} {duration(c.generate_s):>8s} {total:>8s}"
        )
    known = sum(c.total_s or 0.0 for c in todo)
    unknown = sum(c.total_s is None for c in todo)
    lines.append(
        f"{len(todo)} cells to run ({sum(c.status == STALE for c in todo)} stale), "
        f"{len(estimate['cells']) - len(todo)} finished; estimated {duration(known)}"
        + (f" + {unknown} cells not estimated (derived small model)" if unknown else "")
    )
    lines.append(
        f"measured on the target: fine-tune {costs.train * 1e6:.1f} µs, reference NLL "
        f"{costs.nll * 1e6:.1f} µs per padded token; generation {costs.prefill:.2f} s prefill "
        f"+ {costs.step:.3f} s per token per batch (dry run took "
        f"{duration(estimate['measure_seconds'])}; model loads not included; nothing written)"
    )
    return "\n".join(lines)
