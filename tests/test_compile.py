"""``--compile``: the compiled forward trains and scores like the eager one, and effort's taps
bypass it. The tests trace with the "eager" and "aot_eager" backends: inductor's code
generation takes minutes on a small CPU (the device suite measures it on a GPU)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import speccore
from conftest import tiny_select_config
from speccore.config import LoraSettings, TrainSettings
from speccore.data.batches import IGNORE_INDEX, TokenizedData, collate
from speccore.models import attach_lora, speed, tiny_causal_lm
from speccore.models.lora import seeded
from speccore.models.speed import compile_forward, is_compiled, uncompile_forward
from speccore.scoring import score_samples
from speccore.scoring.effort import effort_batch
from speccore.train import finetune

VOCAB = 300
EPS32 = torch.finfo(torch.float32).eps
SETTINGS = TrainSettings(epochs=2, batch_size=2, learning_rate=5e-3, warmup_ratio=0.2)


def data() -> TokenizedData:
    rng = np.random.default_rng(0)
    ids = [rng.integers(3, VOCAB, int(n)).tolist() for n in rng.integers(8, 24, 10)]
    return TokenizedData(ids, [[IGNORE_INDEX] * 5 + x[5:] for x in ids], 0)


def lora() -> Any:
    model = attach_lora(
        tiny_causal_lm(VOCAB, hidden_size=32, layers=2, seed=0),
        LoraSettings(r=4, dropout=0.0),
        seed=0,
    )
    with seeded(1), torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def lora_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def check_compiled_matches_eager(backend: str) -> None:
    rows = data()
    eager, compiled = lora(), compile_forward(lora(), backend=backend)
    assert is_compiled(compiled) and not is_compiled(eager)
    for score in ("loss", "el2n"):
        want = score_samples(eager, rows, score, max_batch_tokens=64)
        got = score_samples(compiled, rows, score, max_batch_tokens=64)
        np.testing.assert_allclose(got, want, rtol=64 * EPS32)
    s1 = finetune(eager, rows, SETTINGS)
    s2 = finetune(compiled, rows, SETTINGS)
    assert s1["steps"] == s2["steps"]
    a, b = lora_state(eager), lora_state(compiled)
    # Adam turns rounding differences into steps of up to lr each: compare on that scale.
    tol = 64 * EPS32 * SETTINGS.learning_rate * s1["steps"]
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=tol + 1e-6) for k in a)
    # Effort runs the eager forward: its taps survive and give the eager scores exactly.
    batch = collate(rows, range(len(rows)))
    effort = effort_batch(compiled, batch)
    uncompile_forward(compiled)
    assert torch.equal(effort, effort_batch(compiled, batch))
    assert not is_compiled(compiled)


def test_compiled_forward_scores_and_trains_like_eager_dynamo() -> None:
    check_compiled_matches_eager("eager")


@pytest.mark.slow
def test_compiled_forward_scores_and_trains_like_eager_aot_autograd() -> None:
    """aot_eager: a real forward and backward graph through AOT autograd (about a minute)."""
    check_compiled_matches_eager("aot_eager")


def test_select_with_compile_gives_the_same_coreset(
    jsonl_data: Any, model_dirs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(speed, "COMPILE_BACKEND", "eager")
    compiled: list[Any] = []
    real = speed.compile_forward

    def spy(model: Any, backend: str | None = None) -> Any:
        compiled.append(model)
        return real(model, backend)

    monkeypatch.setattr(speed, "compile_forward", spy)
    plain = speccore.select(tiny_select_config(jsonl_data, model_dirs, no_cache=True))
    fast = speccore.select(tiny_select_config(jsonl_data, model_dirs, no_cache=True, compile=True))
    assert len(compiled) == 2  # the small model and the target
    assert fast.indices.tolist() == plain.indices.tolist()
    np.testing.assert_allclose(fast.scores, plain.scores, rtol=1e-4)
    assert not any(is_compiled(m) for m in compiled)  # released with the provider


def test_compile_is_idempotent() -> None:
    model = compile_forward(lora(), backend="eager")
    forward = model.get_base_model().forward
    assert compile_forward(model, backend="eager").get_base_model().forward is forward
    uncompile_forward(model)
    uncompile_forward(model)
    assert not is_compiled(model)
