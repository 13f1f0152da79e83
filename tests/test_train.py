"""LoRA fine-tuning: learning, determinism, what changes, schedule, step counts, token masks."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from conftest import model_tol, tol
from speccore.config import LoraSettings, TrainSettings
from speccore.data.batches import IGNORE_INDEX, TokenizedData, collate
from speccore.models import adapter_fingerprint, attach_lora, tiny_causal_lm, tiny_tokenizer
from speccore.scoring import losses
from speccore.scoring.losses import response_loss
from speccore.train import finetune, lr_factor, plan_steps, warmup_steps
from speccore.utils.errors import ConfigError, ModelError

PAIRS = [
    ("Question: capital of France? Answer:", " Paris."),
    ("Translate: the house is small.", " Das Haus ist klein."),
    ("Solve: 7 times 6 =", " 42"),
    ("Sentiment: I loved this film.", " Positive."),
    ("Sentiment: the food was cold.", " Negative."),
    ("Poem about the sea:", " waves come and go, the gulls cry."),
]

# Row batching where a test counts steps and samples by rows; TOKENS is the default batching.
FAST = TrainSettings(epochs=2, learning_rate=5e-3, batch_size=2, warmup_ratio=0.25, batching="rows")
TOKENS = replace(FAST, batching="tokens")


@pytest.fixture(scope="module")
def data() -> TokenizedData:
    tok = tiny_tokenizer()
    ids, labels = [], []
    for prompt, response in PAIRS:
        p = tok(prompt).input_ids
        r = [*tok(response).input_ids, tok.eos_token_id]
        ids.append(p + r)
        labels.append([IGNORE_INDEX] * len(p) + r)
    return TokenizedData(ids, labels, tok.pad_token_id)


def _peft(seed: int = 0, dropout: float = 0.0):  # type: ignore[no-untyped-def]
    model = tiny_causal_lm(len(tiny_tokenizer()), hidden_size=32, seed=0)
    return attach_lora(model, LoraSettings(r=4, alpha=8, dropout=dropout), seed=seed)


def _lora_state(model) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _mean_loss(model, data: TokenizedData) -> float:  # type: ignore[no-untyped-def]
    batch = collate(data, range(len(data)))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    return float(torch.nn.functional.cross_entropy(logits[:, :-1][keep], targets[keep]))


def test_loss_decreases_when_overfitting(data: TokenizedData) -> None:
    model = _peft()
    before = _mean_loss(model, data)
    stats = finetune(model, data, replace(FAST, epochs=6, learning_rate=2e-2), desc="overfit")
    after = _mean_loss(model, data)
    assert after < before - 1.0
    assert stats["steps"] == 6 * 3 and stats["final_loss"] < stats["mean_loss"]
    assert stats["tokens_per_s"] > 0 and stats["samples"] == 6 * len(data)
    assert not model.training


@pytest.mark.parametrize("batching", ["tokens", "rows"])
def test_same_seed_same_adapter_bit_for_bit(data: TokenizedData, batching: str) -> None:
    settings = replace(FAST, seed=5, batching=batching)
    runs = []
    for seed in (5, 5, 6):
        model = _peft(dropout=0.1)  # dropout draws random numbers: they must be seeded too
        finetune(model, data, replace(settings, seed=seed))
        runs.append(_lora_state(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_global_rng_is_left_alone(data: TokenizedData) -> None:
    model = _peft(dropout=0.1)
    state = torch.random.get_rng_state()
    finetune(model, data, replace(FAST, epochs=0.5))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_only_lora_weights_change(data: TokenizedData) -> None:
    model = _peft()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora = _lora_state(model)
    finetune(model, data, FAST)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in base.items())
    changed = [n for n, p in lora.items() if not torch.equal(after[n], p)]
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)


def test_schedule_warms_up_then_decays_to_zero() -> None:
    total = 100
    warm = warmup_steps(total, 0.1)
    factors = [lr_factor(s, total, warm) for s in range(total)]
    assert warm == 10
    assert 0 < factors[0] < 0.2
    assert factors[warm] == 1.0 == max(factors)
    rising, falling = factors[: warm + 1], factors[warm:]
    assert all(a < b for a, b in itertools.pairwise(rising))
    assert all(a >= b for a, b in itertools.pairwise(falling))
    assert factors[-1] < 0.01 and lr_factor(total, total, warm) == 0.0
    assert lr_factor(0, 10, 0) == 1.0  # no warm-up: full rate from the first step


@pytest.mark.parametrize(
    ("epochs", "batch_size", "grad_accum", "steps"),
    [
        (0.5, 4, 1, 2),
        (0.5, 4, 2, 1),
        (1.25, 4, 1, 5),
        (3, 5, 1, 12),
        (1, 16, 1, 1),
        (0.01, 4, 1, 1),
    ],
)
def test_fractional_epochs_step_count(
    epochs: float, batch_size: int, grad_accum: int, steps: int
) -> None:
    settings = TrainSettings(
        epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, batching="rows"
    )
    plan = plan_steps(16, settings)
    assert len(plan) == steps
    batches = [b for step in plan for b in step]
    assert all(len(b) <= batch_size for b in batches)
    per_epoch = math.ceil(16 / batch_size)
    first_epoch = batches[:per_epoch]
    if len(batches) >= per_epoch:  # each full epoch visits every sample once
        assert sorted(np.concatenate(first_epoch).tolist()) == list(range(16))


def test_epochs_are_shuffled_by_seed() -> None:
    rows = TrainSettings(epochs=2, batch_size=12, seed=1, batching="rows")
    plan = plan_steps(12, rows)
    again = plan_steps(12, rows)
    other = plan_steps(12, replace(rows, seed=2))
    first, second = plan[0][0], plan[1][0]
    assert not np.array_equal(first, second)  # a new order each epoch
    assert np.array_equal(first, again[0][0]) and not np.array_equal(first, other[0][0])


def test_fractional_epochs_in_finetune(data: TokenizedData) -> None:
    stats = finetune(_peft(), data, replace(FAST, epochs=0.5, batch_size=2))
    assert stats["steps"] == 2 and stats["samples"] == 4


def test_token_mask_equals_ignored_labels(data: TokenizedData) -> None:
    rng = np.random.default_rng(0)
    masks = [rng.integers(0, 2, len(x)).tolist() for x in data.input_ids]
    masked = TokenizedData(data.input_ids, data.labels, data.pad_token_id, token_masks=masks)
    relabelled = TokenizedData(
        data.input_ids,
        [
            [t if m else IGNORE_INDEX for t, m in zip(lab, mk, strict=True)]
            for lab, mk in zip(data.labels, masks, strict=True)
        ],
        data.pad_token_id,
    )
    a, b, plain = _peft(), _peft(), _peft()
    finetune(a, masked, TOKENS)
    finetune(b, relabelled, TOKENS)
    finetune(plain, data, TOKENS)
    assert adapter_fingerprint(a) == adapter_fingerprint(b) != adapter_fingerprint(plain)


def drift_atol(model: Any, data: TokenizedData, settings: TrainSettings, steps: int) -> float:
    """How far apart two fine-tunes' weights may end whose gradients differ by rounding only
    (another split of a batch, another logits window).

    Each step's gradients are a forward and a backward pass apart (model_tol). Adam's step is
    lr * m / sqrt(v): at most about lr in size, with about twice the gradients' relative error
    (m and v). Over ``steps`` steps: steps * lr * 2 * rtol, to first order (at these learning
    rates the later gradients barely see the drift).
    """
    rtol = model_tol(model, int(max(data.lengths)), backward=True)
    return steps * settings.learning_rate * 2 * rtol


def test_splitting_batches_by_tokens_learns_the_same(data: TokenizedData) -> None:
    whole, split = _peft(), _peft()
    s1 = finetune(whole, data, replace(FAST, batch_size=3))
    s2 = finetune(split, data, replace(FAST, batch_size=3), max_batch_tokens=12)
    assert s1["steps"] == s2["steps"]
    # Equal up to float summation order: the losses up to a forward and backward pass's
    # rounding, the weights up to the drift that Adam makes of it.
    rtol = model_tol(whole, int(max(data.lengths)), backward=True)
    assert math.isclose(s1["mean_loss"], s2["mean_loss"], rel_tol=rtol)
    a, b = _lora_state(whole), _lora_state(split)
    atol = drift_atol(whole, data, replace(FAST, batch_size=3), int(s1["steps"]))
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=atol) for k in a)


def test_zero_epochs_and_bad_settings(data: TokenizedData) -> None:
    model = _peft()
    before = adapter_fingerprint(model)
    assert finetune(model, data, replace(FAST, epochs=0))["steps"] == 0
    assert adapter_fingerprint(model) == before
    with pytest.raises(ConfigError, match="--batch-size"):
        finetune(model, data, replace(FAST, batch_size=0))
    with pytest.raises(ConfigError, match="--warmup-ratio"):
        finetune(model, data, replace(FAST, warmup_ratio=1.5))
    with pytest.raises(ModelError, match="no trainable parameters"):
        finetune(tiny_causal_lm(400).requires_grad_(False), data, FAST)


def test_logits_over_the_response_window_learn_the_same(
    data: TokenizedData, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training computes logits only over each batch's response window: same adapter as full."""
    windowed, full = _peft(dropout=0.1), _peft(dropout=0.1)
    tokens: list[int] = []  # per forward pass: the batch length, and the lm_head's positions
    head_tokens: list[int] = []
    embed, head = windowed.get_input_embeddings(), windowed.get_output_embeddings()
    embed.register_forward_hook(lambda _m, args, _out: tokens.append(args[0].shape[1]))
    head.register_forward_hook(lambda _m, args, _out: head_tokens.append(args[0].shape[1]))
    s1 = finetune(windowed, data, replace(FAST, batch_size=3))
    assert len(tokens) == len(head_tokens) > 0
    assert all(h < t for h, t in zip(head_tokens, tokens, strict=True))
    monkeypatch.setattr(losses, "LOGITS_WINDOW", False)
    s2 = finetune(full, data, replace(FAST, batch_size=3))
    assert s1["steps"] == s2["steps"]
    rtol = model_tol(windowed, int(max(data.lengths)), backward=True)  # as for split batches
    assert math.isclose(s1["final_loss"], s2["final_loss"], rel_tol=rtol)
    a, b = _lora_state(windowed), _lora_state(full)
    atol = drift_atol(windowed, data, replace(FAST, batch_size=3), int(s1["steps"]))
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=atol) for k in a)


def test_loss_sum_over_the_window_equals_the_full_loss_sum(
    data: TokenizedData, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One batch with right padding: the windowed loss and its LoRA gradients match full logits."""
    model = _peft()
    with torch.no_grad():  # a non-zero B, so that the A matrices get a gradient too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = collate(data, range(len(data)))
    results = []
    for window in (True, False):
        monkeypatch.setattr(losses, "LOGITS_WINDOW", window)
        model.zero_grad(set_to_none=True)
        loss = response_loss(model, batch).total
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((float(loss.detach()), grads))
    (l1, g1), (l2, g2) = results
    # The lm_head on the window against every position: other float32 sums, in the forward
    # pass for the loss; in the backward too for a weight's gradient, which also sums over the
    # batch's tokens (entries near 0 cancel: their error is relative to the largest).
    tokens = int(max(data.lengths))
    assert math.isclose(l1, l2, rel_tol=model_tol(model, tokens))
    assert g1.keys() == g2.keys() and g1
    rtol = model_tol(model, tokens, backward=True) + tol(torch.float32, int(sum(data.lengths)))
    for k in g1:
        atol = rtol * float(g2[k].abs().max())
        assert torch.allclose(g1[k], g2[k], rtol=rtol, atol=atol), k
