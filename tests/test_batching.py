"""Token batching of the fine-tune: plans, padding, the objective, the schedule, no host syncs,
and the device helpers (copies, fused AdamW, adapter autocast) whose GPU side is a choice."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

import speccore
import speccore.train.loop as train_lora
from conftest import ModelWorkSpy, tiny_select_config
from speccore.config import LoraSettings, TrainSettings
from speccore.data.batches import IGNORE_INDEX, TokenizedData, collate, copy_mode, to_device
from speccore.models import attach_lora, tiny_causal_lm
from speccore.models.lora import seeded
from speccore.models.speed import adamw, adamw_kind, adapter_autocast, autocast_dtype
from speccore.scoring import losses
from speccore.selection.base import StageTimer
from speccore.train import finetune, lr_factor, plan_steps, warmup_steps
from speccore.train.batching import (
    MAX_MEMORY_TOKENS,
    MIN_MEMORY_TOKENS,
    batch_budget,
    bytes_per_token,
    memory_batch_tokens,
    padded_tokens,
    token_batches,
)
from speccore.utils.errors import ConfigError, ModelError

VOCAB = 300
EPS32 = torch.finfo(torch.float32).eps


def rows_of(lengths: np.ndarray, seed: int = 0, response: int = 4) -> TokenizedData:
    """Rows of the given lengths whose last ``response`` tokens (at most) are learned."""
    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for n in lengths.tolist():
        row = rng.integers(3, VOCAB, n).tolist()
        cut = max(1, n - response)
        ids.append(row)
        labels.append([IGNORE_INDEX] * cut + row[cut:])
    return TokenizedData(ids, labels, pad_token_id=0)


def lora(seed: int = 0) -> Any:
    base = tiny_causal_lm(VOCAB, hidden_size=32, layers=2, seed=0)
    model = attach_lora(base, LoraSettings(r=4, alpha=8, dropout=0.0), seed=seed)
    with seeded(seed + 1), torch.no_grad():  # non-zero B: the A matrices get gradients too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


LENGTHS = np.random.default_rng(3).integers(6, 60, 40)
TOKENS = TrainSettings(epochs=1, batch_size=4, learning_rate=1e-3, warmup_ratio=0.2)


# --- plans -------------------------------------------------------------------------------------


def test_an_epoch_visits_every_row_once_in_batches_within_the_budget() -> None:
    budget = 160
    batches = token_batches(LENGTHS, budget, window=16, seed=0)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(len(LENGTHS)))
    for b in batches:  # within the budget, or a single row
        assert len(b) * int(LENGTHS[b].max()) <= budget or len(b) == 1
    other = token_batches(LENGTHS, budget, window=16, seed=1)
    assert [b.tolist() for b in batches] != [b.tolist() for b in other]
    again = token_batches(LENGTHS, budget, window=16, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))


def test_token_batches_pad_less_than_row_batches() -> None:
    lengths = np.random.default_rng(0).integers(20, 400, 400)
    tokens = [b for s in plan_steps(lengths, replace(TOKENS, batch_size=8)) for b in s]
    rows = [
        b for s in plan_steps(lengths, replace(TOKENS, batch_size=8, batching="rows")) for b in s
    ]
    real_t, padded_t = padded_tokens(lengths, tokens)
    real_r, padded_r = padded_tokens(lengths, rows)
    assert real_t == real_r == int(lengths.sum())
    assert padded_t / real_t < 1.1 < padded_r / real_r  # rows of 8 at random: ~1.5x


def test_the_automatic_budget_keeps_about_the_steps_of_row_batching() -> None:
    """0 = batch_size rows of the mean length: about n / batch_size batches per epoch."""
    assert batch_budget(LENGTHS, TOKENS) == math.ceil(4 * LENGTHS.mean())
    assert batch_budget(LENGTHS, replace(TOKENS, batch_tokens=100)) == 100
    steps = len(plan_steps(LENGTHS, TOKENS))
    assert len(LENGTHS) / 4 <= steps <= 1.5 * len(LENGTHS) / 4


@pytest.mark.parametrize(("epochs", "grad_accum"), [(1, 1), (2, 1), (0.5, 1), (2.5, 2), (0.01, 1)])
def test_fractional_epochs_and_accumulation(epochs: float, grad_accum: int) -> None:
    settings = replace(TOKENS, epochs=epochs, grad_accum=grad_accum)
    plan = plan_steps(LENGTHS, settings)
    batches = [b for step in plan for b in step]
    per_epoch = len(token_batches(LENGTHS, batch_budget(LENGTHS, settings), 200, settings.seed))
    whole = int(epochs)
    assert len(batches) >= max(1, whole * per_epoch)
    assert len(batches) <= math.ceil(epochs * per_epoch) + whole  # epochs differ by a batch
    assert all(len(step) <= grad_accum for step in plan) and len(plan[0]) == min(
        grad_accum, len(batches)
    )


def test_token_batching_needs_lengths_and_checks_settings() -> None:
    with pytest.raises(ConfigError, match="lengths"):
        plan_steps(10, TOKENS)
    assert len(plan_steps(10, replace(TOKENS, batching="rows"))) == 3
    for bad in (replace(TOKENS, batch_tokens=-1), replace(TOKENS, batching="words")):
        with pytest.raises(ConfigError):
            bad.validate()


# --- the objective and the schedule ------------------------------------------------------------


class Recorder(torch.optim.Optimizer):
    """Records each step's gradients and learning rate; changes no weight."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float) -> None:
        super().__init__(params, {"lr": lr})
        self.grads: list[list[torch.Tensor]] = []
        self.lrs: list[float] = []

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        group = self.param_groups[0]
        self.grads.append([p.grad.clone() for p in group["params"]])
        self.lrs.append(group["lr"])


def recorded(
    monkeypatch: pytest.MonkeyPatch, data: TokenizedData, settings: TrainSettings, **kw: Any
) -> Recorder:
    made: list[Recorder] = []

    def make(params: list[torch.nn.Parameter], lr: float, _wd: float) -> Recorder:
        made.append(Recorder(params, lr))
        return made[-1]

    monkeypatch.setattr(train_lora, "adamw", make)
    finetune(lora(), data, settings, **kw)
    return made[0]


def test_two_batchings_of_the_same_rows_give_the_same_gradient(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One step over all rows: one big batch, or many token batches accumulated. The loss is
    the step's summed token losses over its response tokens, so the batch shape does not
    change it; float32 summation order is all that differs."""
    data = rows_of(LENGTHS, response=9)
    whole = replace(TOKENS, batch_tokens=10**6, max_grad_norm=0.0)
    small = replace(whole, batch_tokens=120)
    n_batches = len(plan_steps(data.lengths, small))
    assert n_batches > 5
    one = recorded(monkeypatch, data, whole).grads
    many = recorded(monkeypatch, data, replace(small, grad_accum=n_batches)).grads
    assert len(one) == len(many) == 1
    for a, b in zip(one[0], many[0], strict=True):
        scale = float(a.abs().max())
        torch.testing.assert_close(b, a, rtol=64 * EPS32, atol=64 * EPS32 * scale)
    assert any(float(g.abs().max()) > 0 for g in one[0])


def test_the_schedule_runs_over_the_planned_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    data = rows_of(LENGTHS)
    settings = replace(TOKENS, epochs=2)
    n = len(plan_steps(data.lengths, settings))
    lrs = recorded(monkeypatch, data, settings).lrs
    warm = warmup_steps(n, settings.warmup_ratio)
    want = [settings.learning_rate * lr_factor(s, n, warm) for s in range(n)]
    assert len(lrs) == n and np.allclose(lrs, want, rtol=1e-12)


def test_finetune_reports_padding_and_the_budget() -> None:
    data = rows_of(LENGTHS)
    stats = finetune(lora(), data, TOKENS)
    assert stats["tokens"] == int(LENGTHS.sum()) and stats["samples"] == len(LENGTHS)
    assert stats["tokens"] <= stats["padded_tokens"] <= 1.2 * stats["tokens"]
    assert stats["batch_tokens"] == batch_budget(LENGTHS, TOKENS)
    rows = finetune(lora(), data, replace(TOKENS, batching="rows"))
    assert rows["batch_tokens"] == 0 and rows["padded_tokens"] > stats["padded_tokens"]


def test_the_token_budget_changes_the_adapter_and_reruns_are_bit_identical() -> None:
    data = rows_of(LENGTHS)

    def state(settings: TrainSettings) -> dict[str, torch.Tensor]:
        model = lora()
        finetune(model, data, settings)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    a, b, c = state(TOKENS), state(TOKENS), state(replace(TOKENS, batch_tokens=64))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# --- no host syncs -----------------------------------------------------------------------------


def test_the_loss_is_read_once_per_interval_and_windows_come_from_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads: list[int] = []
    windows: list[torch.device] = []
    real_read, real_window = train_lora.RunState.read_losses, losses.response_window

    def read(self: Any) -> bool:
        reads.append(len(self.pending))
        return real_read(self)

    def window(labels: torch.Tensor) -> int:
        windows.append(labels.device)
        return real_window(labels)

    monkeypatch.setattr(train_lora.RunState, "read_losses", read)
    monkeypatch.setattr(losses, "response_window", window)
    data = rows_of(LENGTHS)
    settings = replace(TOKENS, epochs=3, batch_tokens=100)
    n_steps = len(plan_steps(data.lengths, settings))
    n_batches = sum(len(s) for s in plan_steps(data.lengths, settings))
    assert n_steps > 2 * train_lora.LOSS_EVERY
    stats = finetune(lora(), data, settings)
    moved = [r for r in reads if r]
    assert len(moved) == math.ceil(n_steps / train_lora.LOSS_EVERY)
    assert sum(moved) == n_steps and math.isfinite(stats["final_loss"])
    # Once per batch, by the batch loop, from the host's labels: the model never asks again.
    assert len(windows) == n_batches and {d.type for d in windows} == {"cpu"}


def test_a_non_finite_loss_still_stops_the_fine_tune() -> None:
    data = rows_of(LENGTHS)
    model = lora()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    with pytest.raises(ModelError, match="loss became nan"):
        finetune(model, data, TOKENS)


# --- device helpers: the choice is tested here, its GPU effect by the device suite ------------


def test_copies_are_pinned_and_non_blocking_on_cuda_only() -> None:
    assert copy_mode(torch.device("cuda")) == (True, True)
    assert copy_mode(torch.device("cuda:1")) == (True, True)
    assert copy_mode(torch.device("cpu")) == (False, False)
    batch = collate(rows_of(LENGTHS[:3]), range(3))
    moved = to_device(batch, torch.device("cpu"))
    assert all(moved[k] is batch[k] for k in batch)  # no copy at all on the CPU


def fake_param(device: str, floating: bool = True) -> Any:
    return SimpleNamespace(
        device=torch.device(device), is_floating_point=lambda: floating, dtype=torch.float32
    )


def test_adamw_is_fused_when_every_parameter_is_a_cuda_float() -> None:
    assert adamw_kind([fake_param("cuda:0"), fake_param("cuda:1")]) == "fused"
    assert adamw_kind([fake_param("cuda"), fake_param("cpu")]) == "default"
    assert adamw_kind([fake_param("cuda", floating=False)]) == "default"
    assert adamw_kind([]) == "default"
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = adamw(params, 1e-3, 0.0)
    assert not opt.defaults["fused"]


def test_adapter_autocast_only_for_a_half_base_with_float32_adapters() -> None:
    model = lora()
    assert autocast_dtype(model) is None  # all float32
    half_base = lora()
    for name, p in half_base.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16)
    assert autocast_dtype(half_base) == torch.bfloat16
    all_half = lora().to(torch.bfloat16)
    assert autocast_dtype(all_half) is None

    seen: list[torch.dtype] = []
    module = next(m for n, m in half_base.named_modules() if n.endswith("lora_A.default"))
    module.register_forward_hook(lambda _m, _a, out: seen.append(out.dtype))
    batch = collate(rows_of(LENGTHS[:3]), range(3))
    with torch.no_grad():
        losses.response_loss(half_base, batch)
        with adapter_autocast(half_base):
            losses.response_loss(half_base, batch)
    assert seen == [torch.float32, torch.bfloat16]  # peft's float32 math, then the base's


# --- memory-sized forwards ---------------------------------------------------------------------


def test_bytes_per_token_is_near_the_suites_measurement() -> None:
    """The device suite's 0.5B Llama (49k vocabulary) peaked at 12.7 GiB for 8,192 tokens of
    effort with about 1 GiB of bf16 weights: ~1.5 MB per token."""
    from speccore.models.tiny import llama_config_for

    config = llama_config_for(0.5e9, vocab_size=49152)
    measured = (12.7 - 1.0) * 2**30 / 8192
    assert measured / 2 <= bytes_per_token(config) <= 2 * measured


def test_memory_batch_tokens_is_a_clamped_power_of_two() -> None:
    config = SimpleNamespace(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, vocab_size=49152
    )
    sizes = [memory_batch_tokens(config, g * 2**30) for g in (1, 4, 16, 140, 4096)]
    assert all(s & (s - 1) == 0 for s in sizes)
    assert sizes == sorted(sizes) and sizes[0] == MIN_MEMORY_TOKENS
    assert sizes[-1] == MAX_MEMORY_TOKENS
    assert memory_batch_tokens(config, 16 * 2**30) * bytes_per_token(config) <= 16 * 2**30


# --- stage statistics and cache keys -----------------------------------------------------------


def test_stage_timer_counts_tokens_padding_and_rate() -> None:
    timer = StageTimer()
    with timer.stage("fine-tune"):
        pass
    timer.timings["fine-tune"] = 2.0
    timer.count("fine-tune", 300, 400)
    timer.count("fine-tune", 100, 100)
    stats = timer.throughput()["fine-tune"]
    assert stats == {
        "tokens": 400,
        "padding_tokens": 100,
        "padding_fraction": 0.2,
        "tokens_per_s": 200.0,
    }


def test_selection_json_records_tokens_per_stage_and_the_adapter_key_has_the_batching(
    jsonl_data: Any, model_dirs: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = str(tmp_path / "cache")
    counter = ModelWorkSpy(monkeypatch)
    sel = speccore.select(tiny_select_config(jsonl_data, model_dirs, cache_dir=cache))
    stages = sel.info["stage_tokens"]
    assert {"small fine-tune", "small scoring", "target verification"} <= set(stages)
    tune = stages["small fine-tune"]
    assert tune["tokens"] > 0 and 0 <= tune["padding_fraction"] < 1 and tune["tokens_per_s"] > 0
    assert counter.finetunes == [24]
    speccore.select(tiny_select_config(jsonl_data, model_dirs, cache_dir=cache))
    assert counter.finetunes == [24]  # same batching: the adapter from the cache
    for other in ({"batch_tokens": 64}, {"batching": "rows"}):
        speccore.select(tiny_select_config(jsonl_data, model_dirs, cache_dir=cache, **other))
    assert counter.finetunes == [24, 24, 24]  # each batching tunes its own adapter


def test_scoring_and_fine_tuning_a_bf16_base_run_the_adapters_in_bf16() -> None:
    """The runner and the fine-tune autocast a bf16 base with float32 adapters: the LoRA
    outputs are bf16, the adapter weights stay float32 (the optimizer's master copy) and
    learn. Effort's bound against float32 is tests/test_gpu_path.py's (bf16-fp32-adapters)."""
    from speccore.scoring import score_samples

    model = lora()
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16)
    seen: list[torch.dtype] = []
    module = next(m for n, m in model.named_modules() if n.endswith("lora_A.default"))
    module.register_forward_hook(lambda _m, _a, out: seen.append(out.dtype))
    data = rows_of(LENGTHS[:8])
    assert np.isfinite(score_samples(model, data, "effort", max_batch_tokens=256)).all()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    finetune(model, data, replace(TOKENS, learning_rate=1e-2))
    assert seen and set(seen) == {torch.bfloat16}
    after = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert {p.dtype for p in after.values()} == {torch.float32}
    assert not all(torch.equal(before[n], after[n]) for n in before)


def test_max_batch_tokens_auto_is_the_cpu_default_off_a_gpu_and_a_setting_wins() -> None:
    from speccore.train.batching import CPU_BATCH_TOKENS, memory_batch_tokens, resolve_batch_tokens

    model = torch.nn.Linear(4, 4)  # on the CPU: no memory reading
    assert resolve_batch_tokens(0, model) == CPU_BATCH_TOKENS
    assert resolve_batch_tokens(256, model) == 256
    # On a GPU the cap follows free memory, as a power of two: more memory, no smaller a cap.
    config = type("C", (), {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4,
                            "vocab_size": 1000})()  # fmt: skip
    small, large = memory_batch_tokens(config, 2**30), memory_batch_tokens(config, 2**34)
    assert small & (small - 1) == 0 and large >= small
