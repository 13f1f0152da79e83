"""Losses, EL2N and embeddings against direct NumPy loops over a tiny model's outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import MIXED_LENGTHS, lm_head_lengths, mixed_prompt_data, model_tol, tol
from speccore.data.batches import TokenizedData, collate
from speccore.scoring import losses
from speccore.scoring.embeddings import embedding_batch
from speccore.scoring.losses import (
    accepts_logits_to_keep,
    el2n_batch,
    eval_mode,
    forward,
    loss_batch,
    position_ids,
    response_logits,
    response_window,
    sample_losses,
    token_losses,
)

VOCAB = 53
LENGTHS = [5, 12, 8, 3, 10]


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    base = LlamaForCausalLM(config)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def make_data(seed: int = 0) -> TokenizedData:
    rng = np.random.default_rng(seed)
    ids = [rng.integers(1, VOCAB, n).tolist() for n in LENGTHS]
    # Prompts of varying length; the 2-token sample keeps a single counted label.
    labels = [[-100] * (n // 3 + 1) + x[n // 3 + 1 :] for n, x in zip(LENGTHS, ids, strict=True)]
    return TokenizedData(input_ids=ids, labels=labels, pad_token_id=0)


def logits_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad(), eval_mode(model):
        return forward(model, batch).logits


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def numpy_scores(logits: np.ndarray, labels: np.ndarray) -> tuple[list[float], list[float]]:
    """Mean CE and EL2N per sample, by explicit loops over the shifted positions."""
    losses, el2n = [], []
    for b in range(labels.shape[0]):
        ce_sum, err_sum, count = 0.0, 0.0, 0
        for t in range(1, labels.shape[1]):
            y = labels[b, t]
            if y == -100:
                continue
            z = logits[b, t - 1].astype(np.float64)  # position t-1 predicts token t
            p = softmax(z)
            ce_sum += -np.log(p[y])
            onehot = np.zeros_like(p)
            onehot[y] = 1.0
            err_sum += float(np.sqrt(((p - onehot) ** 2).sum()))
            count += 1
        losses.append(ce_sum / count)
        el2n.append(err_sum / count)
    return losses, el2n


def test_token_losses_shift_and_mask() -> None:
    model = tiny_model()
    batch = collate(make_data(), range(len(LENGTHS)))
    logits = logits_of(model, batch)
    ce, mask = token_losses(logits, batch["labels"])
    assert ce.shape == mask.shape == (len(LENGTHS), batch["labels"].shape[1] - 1)
    z, labels = logits.numpy(), batch["labels"].numpy()
    for b in range(len(LENGTHS)):
        for t in range(ce.shape[1]):
            y = labels[b, t + 1]
            assert bool(mask[b, t]) == (y != -100)
            want = 0.0 if y == -100 else -np.log(softmax(z[b, t].astype(np.float64))[y])
            # The same logits: float32 log-softmax (a logsumexp over the 53-token vocabulary)
            # against float64 NumPy; 0 where masked, in both.
            assert float(ce[b, t]) == pytest.approx(want, rel=tol(torch.float32, VOCAB), abs=0)


def test_sample_losses_and_el2n_match_numpy_loops() -> None:
    model = tiny_model()
    batch = collate(make_data(), range(len(LENGTHS)))
    logits = logits_of(model, batch)
    want_loss, want_el2n = numpy_scores(logits.numpy(), batch["labels"].numpy())
    # From the same logits: float32 against float64 NumPy over the vocabulary and the tokens.
    same_logits = tol(torch.float32, VOCAB + max(LENGTHS))
    np.testing.assert_allclose(
        sample_losses(logits, batch["labels"]).numpy(), want_loss, rtol=same_logits
    )
    # loss_batch and el2n_batch run the model again, the lm_head on the response window only:
    # other float32 sums in the forward pass.
    rtol = model_tol(model, max(LENGTHS))
    np.testing.assert_allclose(loss_batch(model, batch).numpy(), want_loss, rtol=rtol)
    np.testing.assert_allclose(el2n_batch(model, batch).numpy(), want_el2n, rtol=rtol)
    assert loss_batch(model, batch).dtype == torch.float64


def test_sample_losses_equal_per_sample_cross_entropy() -> None:
    """Each sample alone, no padding, plain F.cross_entropy on the shifted response tokens."""
    model = tiny_model(seed=2)
    data = make_data(seed=2)
    batched = loss_batch(model, collate(data, range(len(LENGTHS))))
    for i in range(len(LENGTHS)):
        ids = torch.tensor([data.input_ids[i]])
        labels = torch.tensor(data.labels[i])
        with torch.no_grad(), eval_mode(model):
            logits = model(input_ids=ids).logits[0]
        want = F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100)
        # Padded batch against a lone sample: other float32 sums in the forward pass.
        assert float(batched[i]) == pytest.approx(float(want), rel=model_tol(model, max(LENGTHS)))


@pytest.mark.parametrize("score", [loss_batch, el2n_batch])
def test_left_and_right_padding_agree(score) -> None:
    model = tiny_model(seed=1)
    data = make_data(seed=1)
    right = score(model, collate(data, range(len(LENGTHS)), "right"))
    left = score(model, collate(data, range(len(LENGTHS)), "left"))
    # Other padding, other float32 sums (scores are bounded away from 0: a relative bound).
    torch.testing.assert_close(left, right, rtol=model_tol(model, max(LENGTHS)), atol=0.0)


def test_position_ids_count_real_tokens() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_a_sample_without_response_tokens_is_nan() -> None:
    model = tiny_model()
    data = make_data()
    data.labels[1] = [-100] * len(data.labels[1])
    batch = collate(data, range(len(LENGTHS)))
    for score in (loss_batch(model, batch), el2n_batch(model, batch)):
        assert score.isnan().tolist() == [False, True, False, False, False]


def test_embeddings_match_a_manual_mean() -> None:
    model = tiny_model(seed=4)
    batch = collate(make_data(seed=4), range(len(LENGTHS)))
    emb = embedding_batch(model, batch)
    with torch.no_grad(), eval_mode(model):
        hidden = forward(model, batch, output_hidden_states=True).hidden_states[-1].numpy()
    labels = batch["labels"].numpy()
    assert emb.shape == (len(LENGTHS), 32)
    # The scorer's forward may stop before the lm_head, so it need not repeat this one's sums.
    # A unit vector's entries near 0 carry the error of the whole vector: atol = rtol.
    rtol = model_tol(model, max(LENGTHS))
    for b in range(len(LENGTHS)):
        rows = [hidden[b, t] for t in range(labels.shape[1]) if labels[b, t] != -100]
        mean = np.mean(rows, axis=0)
        np.testing.assert_allclose(
            emb[b].numpy(), mean / np.linalg.norm(mean), rtol=rtol, atol=rtol
        )
    # A float32 norm of 32 entries, computed by the scorer and again by NumPy.
    unit = tol(torch.float32, 2 * 32)
    np.testing.assert_allclose(np.linalg.norm(emb.numpy(), axis=1), 1.0, rtol=unit)


def test_scorers_restore_the_models_mode() -> None:
    model = tiny_model()
    model.train()
    batch = collate(make_data(), range(len(LENGTHS)))
    for fn in (loss_batch, el2n_batch, embedding_batch):
        fn(model, batch)
        assert all(m.training for m in model.modules())


# --- logits only over the response window ---------------------------------------------------


def test_response_window() -> None:
    i = -100
    # Right padding: the first counted label is at column 3, so logits from column 2 on.
    right = torch.tensor([[i, i, i, 7, 7, i], [i, i, i, i, 7, 7]])
    assert response_window(right) == 6 - 2
    # Left padding: row 0's response starts at column 4, row 1's at 5: the earlier one decides.
    left = torch.tensor([[i, i, i, i, 7, 7], [i, i, i, i, i, 7]])
    assert response_window(left) == 6 - 3
    assert response_window(torch.tensor([[5, 7, 7], [5, 7, 7]])) == 3  # all counted: every row
    assert response_window(torch.full((2, 4), i)) == 1  # nothing counted: one (unused) position
    # A counted label in column 0 has no predicting logit and does not widen the window.
    assert response_window(torch.tensor([[7, i, i, 7]])) == 2
    assert response_window(torch.tensor([[7]])) == 1


@pytest.mark.parametrize("side", ["right", "left"])
def test_response_logits_give_the_full_token_losses(side: str) -> None:
    model = tiny_model(seed=5)
    batch = collate(mixed_prompt_data(VOCAB, seed=5), range(len(MIXED_LENGTHS)), side)
    length = batch["labels"].shape[1]
    full_ce, full_mask = token_losses(logits_of(model, batch), batch["labels"])
    seen = lm_head_lengths(model)
    with torch.no_grad(), eval_mode(model):
        logits, labels = response_logits(model, batch)
    keep = response_window(batch["labels"])
    assert keep < length and seen == [keep]  # the lm_head really ran on the window only
    assert logits.shape[1] == keep and torch.equal(labels, batch["labels"][:, length - keep :])
    ce, mask = token_losses(logits, labels)
    # Nothing is counted left of the window; inside it, the same losses.
    assert not full_mask[:, : length - keep].any()
    assert torch.equal(mask, full_mask[:, length - keep :])
    # The lm_head on the window only against every position: other float32 matmuls (rows of up
    # to 24 tokens); 0 where masked, in both.
    rtol = model_tol(model, max(MIXED_LENGTHS))
    torch.testing.assert_close(ce, full_ce[:, length - keep :], rtol=rtol, atol=0.0)


@pytest.mark.parametrize("score", [loss_batch, el2n_batch])
@pytest.mark.parametrize("side", ["right", "left"])
def test_windowed_scores_equal_full_logit_scores(
    score, side: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model(seed=6)
    data = mixed_prompt_data(VOCAB, seed=6)
    data.labels[3] = [-100] * len(data.labels[3])  # and a sample with nothing to score
    batch = collate(data, range(len(MIXED_LENGTHS)), side)
    seen = lm_head_lengths(model)
    windowed = score(model, batch)
    monkeypatch.setattr(losses, "LOGITS_WINDOW", False)
    full = score(model, batch)
    assert seen[0] < seen[1] == batch["labels"].shape[1]
    assert windowed.isnan().tolist() == full.isnan().tolist() == [False, False, False, True, False]
    rtol = model_tol(model, max(MIXED_LENGTHS))  # window against all positions, as above
    torch.testing.assert_close(windowed, full, rtol=rtol, atol=0.0, equal_nan=True)


def test_a_model_without_logits_to_keep_gets_full_logits() -> None:
    """A forward that does not name logits_to_keep (a **kwargs catch-all is not enough)."""

    class Wrapper(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs: object) -> object:
            assert "logits_to_keep" not in kwargs
            return self.inner(**kwargs)

    model = tiny_model(seed=7)
    wrapped = Wrapper(model)
    assert accepts_logits_to_keep(model) and not accepts_logits_to_keep(wrapped)
    batch = collate(mixed_prompt_data(VOCAB, seed=7), range(len(MIXED_LENGTHS)), "left")
    with torch.no_grad(), eval_mode(model):
        logits, labels = response_logits(wrapped, batch)
    keep = response_window(batch["labels"])
    assert logits.shape[1] == labels.shape[1] == keep  # sliced after the fact
    rtol = model_tol(model, max(MIXED_LENGTHS))  # sliced logits against a windowed lm_head
    for score in (loss_batch, el2n_batch):
        torch.testing.assert_close(score(wrapped, batch), score(model, batch), rtol=rtol, atol=0.0)


def test_embeddings_skip_the_lm_head(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(seed=8)
    batch = collate(mixed_prompt_data(VOCAB, seed=8), range(len(MIXED_LENGTHS)), "left")
    seen = lm_head_lengths(model)
    fast = embedding_batch(model, batch)
    monkeypatch.setattr(losses, "LOGITS_WINDOW", False)
    full = embedding_batch(model, batch)
    assert seen == [1, batch["labels"].shape[1]]
    # Unit vectors from forwards of other lengths; entries near 0: atol = rtol.
    rtol = model_tol(model, max(MIXED_LENGTHS))
    torch.testing.assert_close(fast, full, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("side", ["right", "left"])
def test_gemma3_window_equals_full_logits(side: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The target family: sliding-window attention and soft-capped logits, sliced the same way."""
    from speccore.models import tiny_causal_lm

    base = tiny_causal_lm(VOCAB, arch="gemma3", seed=9)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    assert accepts_logits_to_keep(model)
    batch = collate(mixed_prompt_data(VOCAB, seed=9), range(len(MIXED_LENGTHS)), side)
    seen = lm_head_lengths(model)
    windowed = [loss_batch(model, batch), el2n_batch(model, batch)]
    monkeypatch.setattr(losses, "LOGITS_WINDOW", False)
    full = [loss_batch(model, batch), el2n_batch(model, batch)]
    assert seen[0] < seen[-1] == batch["labels"].shape[1]
    rtol = model_tol(model, max(MIXED_LENGTHS))  # window against all positions
    for a, b in zip(windowed, full, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=0.0)
