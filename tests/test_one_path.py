"""One path per computation: one prompt encoder, one response loss, one batch loop, one bar."""

from __future__ import annotations

import importlib
import io
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
import torch

from conftest import model_tol, tol
from speccore.bench.generate import encode_prompts, generate
from speccore.config import LoraSettings, TrainSettings
from speccore.data import Formatting, prompt_texts, tokenize_dataset
from speccore.data.batches import (
    IGNORE_INDEX,
    BatchLoop,
    TokenizedData,
    collate,
    length_grouped_batches,
)
from speccore.models import attach_lora, load_model, tiny_causal_lm, tiny_tokenizer
from speccore.scoring import score_samples
from speccore.scoring.losses import ResponseLoss, response_loss
from speccore.tokens import token_losses_of
from speccore.train import finetune
from speccore.utils import progress as progress_module
from speccore.utils.progress import progress, set_quiet

# --- one prompt encoder ----------------------------------------------------------------------

LONG = " ".join(["the report describes sales costs and the plan for next year"] * 24)
ROWS = [
    {"q": "What is the capital of France?", "a": "Paris.", "m": None},
    {"q": LONG, "a": "A long report about sales.", "m": None},  # truncated at MAX_LENGTH
]
MESSAGES = [
    [
        {"role": "user", "content": "Translate: the house is small."},
        {"role": "assistant", "content": "Das Haus ist klein."},
        {"role": "user", "content": "And: the dog is old."},
        {"role": "assistant", "content": "Der Hund ist alt."},
    ],
    [{"role": "user", "content": LONG}, {"role": "assistant", "content": "Sales."}],
]
MAX_LENGTH = 128

# A Gemma-style chat template that writes its own BOS (the packaged Gemma 3 270M GGUF carries
# no template): with the tokenizer's BOS that makes two, which both paths must reduce to one.
GEMMA_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@pytest.fixture(scope="module")
def packaged_tokenizers() -> Iterator[dict[str, Any]]:
    """The two packaged models' tokenizers, from their converted folders in the user's cache
    (converted once, ~1-3 min the first time; the per-test cache of conftest is bypassed)."""
    from platformdirs import user_cache_dir
    from transformers import AutoTokenizer

    from speccore.models import converted_folder, resolve_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECCORE_CACHE", user_cache_dir("speccore"))
        yield {
            alias: AutoTokenizer.from_pretrained(str(converted_folder(resolve_model(alias))))
            for alias in ("smollm2-135m", "gemma-3-270m")
        }


def _with_template(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``tokenizer`` with a chat template: its own, or the Gemma-style one for this test."""
    if not tokenizer.chat_template:
        monkeypatch.setattr(tokenizer, "chat_template", GEMMA_STYLE_TEMPLATE)
    return tokenizer


def _check_prompts_equal(tokenizer: Any, dataset: datasets.Dataset, fmt: Formatting) -> None:
    """Training ids' prompt part == the generation prompt's ids, row by row; the long row is
    really truncated and keeps a single leading BOS."""
    train = tokenize_dataset(dataset, tokenizer, fmt, MAX_LENGTH)
    texts = prompt_texts(dataset, fmt, tokenizer)
    bos = tokenizer.bos_token_id
    for row, (ids, labels) in enumerate(zip(train.input_ids, train.labels, strict=True)):
        n_prompt = labels.index(next(t for t in labels if t != IGNORE_INDEX))
        (prompt,) = encode_prompts(tokenizer, [texts[row]], max_prompt_tokens=n_prompt)
        assert prompt == ids[:n_prompt], f"row {row}"
        (whole,) = encode_prompts(tokenizer, [texts[row]], max_prompt_tokens=10_000)
        assert (len(whole) > n_prompt) == (row == 1), f"row {row}: truncated iff long"
        if bos is not None and whole[0] == bos:
            assert prompt[0] == bos and prompt[1] != bos


FORMS = ["plain", "chat-template", "messages"]


@pytest.mark.parametrize("alias", ["tiny", "tiny-gemma-like"])
@pytest.mark.parametrize("form", FORMS)
def test_generation_prompts_equal_the_prompt_part_of_training_ids(
    alias: str, form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if alias == "tiny":
        tokenizer = tiny_tokenizer()
    else:
        tokenizer = tiny_tokenizer(bos_every_call=True, pad_is_eos=False)
    _check_form(tokenizer, form, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma-3-270m"])
@pytest.mark.parametrize("form", FORMS)
def test_generation_prompts_equal_the_prompt_part_of_training_ids_packaged(
    alias: str, form: str, packaged_tokenizers: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same on the packaged models' tokenizers (converted once: minutes the first time)."""
    _check_form(packaged_tokenizers[alias], form, monkeypatch)


def _check_form(tokenizer: Any, form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if form == "plain":
        dataset = datasets.Dataset.from_list([{"q": r["q"], "a": r["a"]} for r in ROWS])
        fmt = Formatting(input_field="q", output_field="a")
    elif form == "chat-template":
        dataset = datasets.Dataset.from_list([{"q": r["q"], "a": r["a"]} for r in ROWS])
        fmt = Formatting(input_field="q", output_field="a", chat_template=True)
        tokenizer = _with_template(tokenizer, monkeypatch)
    else:
        dataset = datasets.Dataset.from_list([{"m": m} for m in MESSAGES])
        fmt = Formatting(messages_field="m")
        tokenizer = _with_template(tokenizer, monkeypatch)
    _check_prompts_equal(tokenizer, dataset, fmt)


def test_generate_feeds_the_model_the_training_prompt(model_dirs: dict[str, Path]) -> None:
    """End to end: the ids ``generate`` hands the model (left padding removed) are the training
    prompt, for a truncated row in a batch with a short one."""
    loaded = load_model(str(model_dirs["other"]))  # Gemma-like: BOS on every call
    tokenizer, model = loaded.tokenizer, loaded.model
    dataset = datasets.Dataset.from_list([{"q": r["q"], "a": r["a"]} for r in ROWS])
    fmt = Formatting(input_field="q", output_field="a")
    train = tokenize_dataset(dataset, tokenizer, fmt, MAX_LENGTH)
    n_prompt = train.labels[1].index(next(t for t in train.labels[1] if t != IGNORE_INDEX))
    seen: list[list[int]] = []
    module = importlib.import_module("speccore.bench.generate")  # the module, not the function
    real_greedy = module.greedy_tokens

    def spy(m: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: Any) -> Any:
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            seen.append(ids[mask.bool()].tolist())
        return real_greedy(m, input_ids, attention_mask, **kw)

    texts = prompt_texts(dataset, fmt, tokenizer)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "greedy_tokens", spy)
        generate(
            model, tokenizer, texts, max_new_tokens=2, batch_size=2, max_prompt_tokens=n_prompt
        )
    assert train.input_ids[1][:n_prompt] in seen
    assert len(seen) == 2 and max(len(s) for s in seen) == n_prompt


# --- one response loss -----------------------------------------------------------------------

VOCAB = 71


def _data(seed: int = 0, n: int = 6) -> TokenizedData:
    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for _ in range(n):
        length, prompt = int(rng.integers(7, 16)), int(rng.integers(3, 6))
        x = rng.integers(1, VOCAB, length).tolist()
        ids.append(x)
        labels.append([IGNORE_INDEX] * prompt + x[prompt:])
    return TokenizedData(ids, labels, pad_token_id=0)


def _reference_losses(model: Any, data: TokenizedData, i: int) -> list[float]:
    """One sample alone, unpadded, full logits, float64 log-softmax: -log p(y_t | < t)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([data.input_ids[i]])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    labels = data.labels[i]
    return [-float(logp[t - 1, y]) for t, y in enumerate(labels) if t > 0 and y != IGNORE_INDEX]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_response_loss_equals_a_per_sample_loop(dtype: torch.dtype) -> None:
    model = tiny_causal_lm(VOCAB, seed=1).to(dtype)
    data = _data(seed=1)
    batch = collate(data, range(len(data)))
    with torch.no_grad():
        loss = response_loss(model, batch)
    assert isinstance(loss, ResponseLoss)
    assert loss.tokens.dtype == torch.float32 and loss.mean.dtype == torch.float32
    assert 0 < loss.start < batch["labels"].shape[1]  # the window really cut the prompts
    # A padded batch and a lone sample (rows of up to 15 tokens) round the model's sums
    # differently; bfloat16 also rounds its activations (see model_tol).
    rtol = model_tol(model, 15)
    for i in range(len(data)):
        want = _reference_losses(model, data, i)
        got = loss.tokens[i][loss.mask[i]].tolist()
        assert int(loss.count[i]) == len(got) == len(want) == data.n_response_tokens[i]
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol)
        assert float(loss.mean[i]) == pytest.approx(np.mean(want), rel=rtol)
        assert float(loss.sum[i]) == pytest.approx(np.sum(want), rel=rtol)
    # The total and the sum of the rows' sums add the same float32 token losses in other orders.
    total_tol = tol(torch.float32, int(loss.count.sum()))
    assert float(loss.total) == pytest.approx(float(loss.sum.sum()), rel=total_tol)


def test_scoring_token_scores_and_training_compute_the_same_loss() -> None:
    """The loss score, the per-token losses and the fine-tune's first step all read
    :func:`response_loss`: same numbers as it gives directly."""
    data = _data(seed=2)
    lora = LoraSettings(r=2, alpha=4, dropout=0.0)  # train mode = eval mode
    model = attach_lora(tiny_causal_lm(VOCAB, seed=2), lora, seed=0)
    batch = collate(data, range(len(data)))
    with torch.no_grad():
        direct = response_loss(model, batch)
    # Batches of at most 30 (40 in the fine-tune) tokens against one batch of all rows (up to
    # 15 tokens each): other padding, other float32 sums.
    rtol = model_tol(model, 15)
    scores = score_samples(model, data, "loss", max_batch_tokens=30)
    np.testing.assert_allclose(scores, direct.mean.double().numpy(), rtol=rtol)
    tokens = token_losses_of(model, data, max_batch_tokens=30)
    for i in range(len(data)):
        np.testing.assert_allclose(tokens[i], direct.tokens[i][direct.mask[i]], rtol=rtol)
    # One optimizer step over all samples: its logged loss is the loss before the update.
    settings = TrainSettings(epochs=1, batch_tokens=10**6, learning_rate=1e-3, seed=0)
    stats = finetune(model, data, settings, max_batch_tokens=40)
    want = float(direct.total) / int(direct.mask.sum())
    assert stats["steps"] == 1 and stats["final_loss"] == pytest.approx(want, rel=rtol)


# --- one batch loop, one progress bar --------------------------------------------------------


def test_batch_loop_covers_the_plan_once_and_skips_done_batches() -> None:
    data = _data(seed=3, n=9)
    indices = np.array([8, 2, 5, 2, 0, 7])  # unsorted, with a repeat
    plan = length_grouped_batches(data.lengths[indices], 40)
    assert len(plan) >= 3
    with BatchLoop(data, plan, indices=indices, skip={1}, desc="test") as loop:
        seen = list(loop)
        assert loop.bar.n == loop.bar.total == len(indices)
    assert [b.number for b in seen] == [b for b in range(len(plan)) if b != 1]
    for b in seen:
        np.testing.assert_array_equal(b.samples, indices[b.rows])
        want = collate(data, b.samples)
        assert all(torch.equal(b.tensors[k], want[k]) for k in want)
    with BatchLoop(data, plan, indices=indices, padding_side="left") as loop:
        first = next(iter(loop))
        assert torch.equal(
            first.tensors["input_ids"], collate(data, first.samples, "left")["input_ids"]
        )


def test_longest_first_batches() -> None:
    lengths = np.array([3, 9, 5, 9, 1])
    plan = length_grouped_batches(lengths, 10**9, max_batch_size=2, longest_first=True)
    assert [b.tolist() for b in plan] == [[1, 3], [2, 0], [4]]


def test_progress_shows_an_estimate_and_set_quiet_silences_every_bar() -> None:
    out = io.StringIO()
    bar = progress(total=4, desc="work", file=out, mininterval=0)
    bar.update(1)
    bar.close()
    assert re.search(r"work: .*1/4 \[\d\d:\d\d<\d\d:\d\d", out.getvalue())  # elapsed<left
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils.logging import is_progress_bar_enabled

    data = _data(seed=4, n=3)
    assert not are_progress_bars_disabled() and is_progress_bar_enabled()
    assert datasets.is_progress_bar_enabled()
    try:
        set_quiet(True)
        assert progress_module.is_quiet()
        assert progress(range(3)).disable
        loop = BatchLoop(data, [np.arange(3)])
        assert loop.bar.disable
        loop.bar.close()
        # The libraries' own bars (model downloads, dataset maps) are off too.
        assert are_progress_bars_disabled() and not is_progress_bar_enabled()
        assert not datasets.is_progress_bar_enabled()
    finally:
        set_quiet(False)
    assert not progress(range(3), file=io.StringIO()).disable
    assert not are_progress_bars_disabled() and is_progress_bar_enabled()
    assert datasets.is_progress_bar_enabled()


def test_finetune_shows_progress_by_samples(capsys: pytest.CaptureFixture[str]) -> None:
    data = _data(seed=5, n=4)
    model = attach_lora(tiny_causal_lm(VOCAB, seed=5), LoraSettings(r=2, alpha=4), seed=0)
    settings = replace(TrainSettings(), epochs=2, batch_size=2, seed=0)
    finetune(model, data, settings, desc="tune")
    err = capsys.readouterr().err
    assert re.search(r"tune: .*8/8 \[", err)
