"""score_samples / embed_samples: alignment, batching, errors, checkpoint and resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import model_tol, tol
from speccore.data.batches import TokenizedData, collate, length_grouped_batches
from speccore.scoring.effort import effort_batch, effort_reference
from speccore.scoring.embeddings import embedding_batch
from speccore.scoring.losses import loss_batch
from speccore.scoring.runner import SCORE_FUNCTIONS, embed_samples, score_samples
from speccore.utils.errors import ConfigError, ScoringError
from speccore.utils.io import load_npz

VOCAB = 61
N = 20


def tiny_lora_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = get_peft_model(
        LlamaForCausalLM(config).double(),
        LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
    )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return model


def make_data(n: int = N, seed: int = 0) -> TokenizedData:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 16, n)
    ids = [rng.integers(1, VOCAB, k).tolist() for k in lengths]
    labels = [[-100, -100, *x[2:]] for x in ids]
    return TokenizedData(input_ids=ids, labels=labels, pad_token_id=0)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_lora_llama()


@pytest.fixture(scope="module")
def data() -> TokenizedData:
    return make_data()


def test_effort_scores_equal_the_per_sample_reference(model, data) -> None:
    scores = score_samples(model, data, "effort", max_batch_tokens=40)
    assert scores.dtype == np.float64 and scores.shape == (N,)
    want = np.array([float(effort_reference(model, collate(data, [i]))[0]) for i in range(N)])
    # Batches of at most 40 tokens against one row at a time (rows of up to 15 tokens): other
    # float64 sums in a forward and a backward pass.
    np.testing.assert_allclose(scores, want, rtol=model_tol(model, 15, backward=True))


def test_scores_follow_the_order_of_unsorted_indices(model, data) -> None:
    full = score_samples(model, data, "loss", max_batch_tokens=50)
    indices = np.array([13, 2, 19, 2, 7, 0])  # unsorted, with a repeat
    part = score_samples(model, data, "loss", indices=indices, max_batch_tokens=50)
    # Other rows in a batch, or none: other padding and float64 sums in the forward pass.
    rtol = model_tol(model, 15)
    np.testing.assert_allclose(part, full[indices], rtol=rtol)
    alone = [float(loss_batch(model, collate(data, [i]))[0]) for i in indices]
    np.testing.assert_allclose(part, alone, rtol=rtol)


def test_model_mode_is_restored(model, data) -> None:
    model.train()
    score_samples(model, data, "el2n", indices=np.arange(4))
    assert all(m.training for m in model.modules())
    model.eval()


def test_unknown_score_lists_the_valid_ones(model, data) -> None:
    with pytest.raises(ConfigError, match="effort, el2n, embedding, loss"):
        score_samples(model, data, "grand")


def test_bad_indices_are_refused(model, data) -> None:
    with pytest.raises(ConfigError, match="indices holds 20"):
        score_samples(model, data, "loss", indices=np.array([0, 20]))


def test_empty_indices_give_an_empty_result(model, data) -> None:
    assert score_samples(model, data, "loss", indices=np.array([], dtype=np.int64)).shape == (0,)


def test_a_nan_score_names_the_sample(model, data, monkeypatch) -> None:
    bad_ids = torch.tensor(data.input_ids[17])

    def poisoned(m: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = loss_batch(m, batch)
        for row in range(len(out)):
            real = batch["input_ids"][row][batch["attention_mask"][row].bool()]
            if torch.equal(real, bad_ids):
                out[row] = float("nan")
        return out

    monkeypatch.setitem(SCORE_FUNCTIONS, "loss", poisoned)
    with pytest.raises(ScoringError, match=r"^sample 17: loss is nan; check the data row"):
        score_samples(model, data, "loss", max_batch_tokens=60)


def test_a_sample_without_response_tokens_is_named(model) -> None:
    data = make_data(6, seed=3)
    data.labels[4] = [-100] * len(data.labels[4])
    with pytest.raises(ScoringError, match=r"^sample 4: no response tokens"):
        score_samples(model, data, "effort")


class Interrupted(Exception):
    pass


def counting(fn, fail_after: int | None = None, on_call=None):
    """Wrap a score function: count batches, optionally fail on call ``fail_after + 1``."""
    calls: list[int] = []

    def wrapped(m: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if fail_after is not None and len(calls) == fail_after:
            raise Interrupted
        calls.append(batch["input_ids"].shape[0])
        if on_call is not None:
            on_call(len(calls))
        return fn(m, batch)

    return wrapped, calls


def test_resume_skips_done_batches_and_gives_identical_scores(
    model, data, tmp_path: Path, monkeypatch
) -> None:
    kwargs = {"max_batch_tokens": 45, "checkpoint_every": 1}
    plan = length_grouped_batches(data.lengths, 45)
    assert len(plan) >= 5
    uninterrupted = score_samples(model, data, "effort", max_batch_tokens=45)

    ckpt = tmp_path / "effort.npz"
    first, first_calls = counting(SCORE_FUNCTIONS["effort"], fail_after=3)
    monkeypatch.setitem(SCORE_FUNCTIONS, "effort", first)
    with pytest.raises(Interrupted):
        score_samples(model, data, "effort", checkpoint=ckpt, **kwargs)
    assert len(first_calls) == 3 and ckpt.exists()

    second, second_calls = counting(effort_batch)
    monkeypatch.setitem(SCORE_FUNCTIONS, "effort", second)
    resumed = score_samples(model, data, "effort", checkpoint=ckpt, **kwargs)
    assert len(second_calls) == len(plan) - 3
    assert sum(second_calls) == N - sum(first_calls)
    np.testing.assert_array_equal(resumed, uninterrupted)

    # A finished checkpoint makes a repeat free; the file is left for the caller to delete.
    third, third_calls = counting(effort_batch)
    monkeypatch.setitem(SCORE_FUNCTIONS, "effort", third)
    np.testing.assert_array_equal(
        score_samples(model, data, "effort", checkpoint=ckpt, **kwargs), uninterrupted
    )
    assert third_calls == [] and ckpt.exists()


def test_checkpoints_are_written_during_the_run(model, data, tmp_path: Path, monkeypatch) -> None:
    """Saved about every ``checkpoint_every`` samples, not only when the run stops."""
    ckpt = tmp_path / "loss.npz"
    saved: list[int] = []

    def look(_n_calls: int) -> None:
        saved.append(len(load_npz(ckpt)["batches"]) if ckpt.exists() else 0)

    wrapped, calls = counting(SCORE_FUNCTIONS["loss"], on_call=look)
    monkeypatch.setitem(SCORE_FUNCTIONS, "loss", wrapped)
    score_samples(model, data, "loss", max_batch_tokens=30, checkpoint=ckpt, checkpoint_every=5)
    assert saved[0] == 0 and saved[-1] > 0
    for k, n_saved in enumerate(saved):
        # When batch k starts, batches 0..k-1 are done; fewer than 5 of their samples unsaved.
        unsaved = sum(calls[n_saved:k])
        assert 0 <= n_saved <= k and unsaved < 5


def test_a_checkpoint_for_another_request_is_ignored(
    model, data, tmp_path: Path, monkeypatch
) -> None:
    ckpt = tmp_path / "loss.npz"
    score_samples(model, data, "loss", indices=np.arange(10), checkpoint=ckpt)
    wrapped, calls = counting(SCORE_FUNCTIONS["loss"])
    monkeypatch.setitem(SCORE_FUNCTIONS, "loss", wrapped)
    scores = score_samples(model, data, "loss", indices=np.arange(12), checkpoint=ckpt)
    assert sum(calls) == 12
    np.testing.assert_allclose(scores, score_samples(model, data, "loss", indices=np.arange(12)))


def test_embed_samples_aligns_with_indices(model, data) -> None:
    indices = np.array([5, 1, 18, 5])
    emb = embed_samples(model, data, indices=indices, max_batch_tokens=30)
    assert emb.dtype == np.float32 and emb.shape == (4, 16)
    for row, i in enumerate(indices):
        want = embedding_batch(model, collate(data, [i]))[0].numpy()
        # A float64 forward batched or alone, each rounded once to float32 (one float32 eps);
        # a unit vector's entries near 0 carry the error of the whole vector: atol = rtol.
        rtol = tol(torch.float32, 1) + model_tol(model, 15)
        np.testing.assert_allclose(emb[row], want, rtol=rtol, atol=rtol)
    assert embed_samples(model, data, indices=np.array([], dtype=np.int64)).shape == (0, 16)
