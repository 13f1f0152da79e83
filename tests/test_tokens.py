"""Token-level selection: excess loss, alignment across tokenizers, masks, sidecar, cross-fit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
import torch

import speccore.run.tokens as token_selection
from conftest import model_tol
from speccore import SelectConfig
from speccore.config import LoraSettings, TrainSettings
from speccore.data import IGNORE_INDEX, TokenizedData, collate, tokenize_pairs
from speccore.models import adapter_fingerprint, attach_lora, tiny_causal_lm, tiny_tokenizer
from speccore.run.provider import ModelProvider
from speccore.run.tokens import select_tokens
from speccore.selection import Selection
from speccore.tokens import (
    Ragged,
    attach_token_masks,
    excess_loss,
    export_labels,
    full_masks,
    keep_count,
    load_token_masks,
    map_scores,
    response_offsets,
    save_token_labels,
    save_token_masks,
    select_response_tokens,
    token_losses_of,
)
from speccore.train import finetune
from speccore.utils.errors import ConfigError, DataError

PAIRS = [
    ("Question: what is the capital of France?", "Answer: Paris. The lazy dog."),
    ("Translate: the house is small.", " Das Haus ist klein."),
    ("Solve: 7 times 6 =", " 42"),
    ("Sentiment: I loved this film.", " Positive, the music was great."),
    ("Poem about the sea:", " waves come and go, the gulls cry."),
]


@pytest.fixture(scope="module")
def tok() -> Any:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def data(tok: Any) -> TokenizedData:
    return tokenize_pairs(tok, [p for p, _ in PAIRS], [r for _, r in PAIRS], max_length=64)


def manual_token_losses(model: Any, data: TokenizedData, i: int) -> np.ndarray:
    """One sample alone, unpadded: −log p(token t | logits at t−1) at each response position."""
    ids = torch.tensor([data.input_ids[i]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1).numpy()
    positions = [t for t, lab in enumerate(data.labels[i]) if lab != IGNORE_INDEX]
    return np.array([-logp[t - 1, data.input_ids[i][t]] for t in positions])


# ---------------------------------------------------------------------------------------------
# Excess loss
# ---------------------------------------------------------------------------------------------


def test_token_losses_and_excess_loss_match_a_direct_computation(
    tok: Any, data: TokenizedData
) -> None:
    base = tiny_causal_lm(len(tok), seed=0)
    tuned = tiny_causal_lm(len(tok), seed=1)
    rows = [3, 0, 2, 4]
    # A small token budget forces several padded batches in a length-sorted order.
    got_base = token_losses_of(base, data, rows, max_batch_tokens=60)
    got_tuned = token_losses_of(tuned, data, rows, max_batch_tokens=4096)
    delta = excess_loss(got_base, got_tuned)
    assert got_base.values.dtype == np.float32 and len(delta) == len(rows)
    # Padded batches against one row at a time (rows of up to 64 tokens): other float32 sums
    # in the forward pass. A token loss is about ln(vocabulary), so atol = rtol adds little.
    rtol = model_tol(base, 64)
    for k, i in enumerate(rows):
        want_base = manual_token_losses(base, data, i)
        want_tuned = manual_token_losses(tuned, data, i)
        assert len(delta[k]) == data.n_response_tokens[i]  # the response and its EOS
        np.testing.assert_allclose(got_base[k], want_base, rtol=rtol, atol=rtol)
        # The excess loss is a difference: its error is relative to the two losses, not to it.
        atol = rtol * float(np.max(np.abs(want_base) + np.abs(want_tuned)))
        np.testing.assert_allclose(delta[k], want_base - want_tuned, rtol=0, atol=atol)


def test_token_losses_ignore_masks_and_mark_position_zero(tok: Any, data: TokenizedData) -> None:
    model = tiny_causal_lm(len(tok), seed=0)
    masked = TokenizedData(data.input_ids, data.labels, data.pad_token_id)
    masked.token_masks = [[0] * len(x) for x in data.input_ids]
    plain = token_losses_of(model, data, [1])
    np.testing.assert_array_equal(token_losses_of(model, masked, [1])[0], plain[0])
    # A row without a prompt: its first response token has no logits predicting it.
    ids = data.input_ids[2]
    bare = TokenizedData([ids], [list(ids)], data.pad_token_id)
    got = token_losses_of(model, bare)[0]
    assert np.isnan(got[0]) and np.isfinite(got[1:]).all() and len(got) == len(ids)


def test_ragged_round_trip(tmp_path: Path) -> None:
    from speccore.tokens import load_ragged, save_ragged

    r = Ragged.from_rows([[1.5, 2.0], [], [3.0]], np.float32)
    assert len(r) == 3 and r.lengths.tolist() == [2, 0, 1] and r[-1].tolist() == [3.0]
    save_ragged(tmp_path / "r.npz", r, indices=np.array([4, 7, 9]))
    back, extra = load_ragged(tmp_path / "r.npz")
    assert back.values.tolist() == [1.5, 2.0, 3.0] and back.offsets.tolist() == [0, 2, 2, 3]
    assert extra["indices"].tolist() == [4, 7, 9]
    with pytest.raises(ValueError):
        Ragged(np.zeros(3), np.array([0, 2]))


# ---------------------------------------------------------------------------------------------
# Alignment across tokenizers
# ---------------------------------------------------------------------------------------------


def test_response_offsets_of_two_tokenizers_by_hand() -> None:
    big, small = tiny_tokenizer(vocab_size=400), tiny_tokenizer(vocab_size=300)
    text = "Paris is warm"
    # 400: P | ari | s | Ġis | Ġw | ar | m      300: P | a | ri | s | Ġis | Ġw | a | r | m
    assert response_offsets(big, text).tolist() == [
        [0, 1], [1, 4], [4, 5], [5, 8], [8, 10], [10, 12], [12, 13],
    ]  # fmt: skip
    assert response_offsets(small, text).tolist() == [
        [0, 1], [1, 2], [2, 4], [4, 5], [5, 8], [8, 10], [10, 11], [11, 12], [12, 13],
    ]  # fmt: skip


def test_map_scores_by_hand() -> None:
    big, small = tiny_tokenizer(vocab_size=400), tiny_tokenizer(vocab_size=300)
    text = "Paris is warm"
    b, s = response_offsets(big, text), response_offsets(small, text)
    s_scores = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256], dtype=np.float64)
    # "ari" overlaps "a" and "ri": (2 + 4) / 2; "ar" overlaps "a" and "r": (64 + 128) / 2.
    assert map_scores(s, s_scores, b).tolist() == [1, 3, 8, 16, 32, 96, 256]
    # The other way, each small token takes the score of the one big token covering it.
    b_scores = np.array([1, 2, 3, 4, 5, 6, 7], dtype=np.float64)
    assert map_scores(b, b_scores, s).tolist() == [1, 2, 2, 3, 4, 5, 6, 6, 7]
    # "Ü" is two byte tokens sharing the span (0, 1) in both; "ber" = "b" + "er".
    u_big, u_small = response_offsets(big, "Über"), response_offsets(small, "Über")
    assert u_big.tolist() == [[0, 1], [0, 1], [1, 4]]
    assert u_small.tolist() == [[0, 1], [0, 1], [1, 2], [2, 4]]
    assert map_scores(u_small, np.array([2.0, 4.0, 10.0, 20.0]), u_big).tolist() == [3, 3, 15]


def test_map_scores_edge_cases() -> None:
    src = np.array([[0, 3], [3, 5], [5, 9]])
    scores = np.array([0.1, 0.7, np.nan])
    # Identical spans: bit for bit (no arithmetic at all).
    np.testing.assert_array_equal(map_scores(src, scores, src), scores)
    dst = np.array([[0, 0], [0, 4], [5, 9], [9, 12]])
    got = map_scores(src, scores, dst)
    # Zero width: nan; [0,4) overlaps two tokens; a nan source counts for nothing; past the end.
    assert np.isnan(got[0]) and got[1] == pytest.approx(0.4)
    assert np.isnan(got[2]) and np.isnan(got[3])
    # Spans out of order take the quadratic route and give the same means.
    shuffled = np.array([2, 0, 1])
    want = map_scores(src, np.array([1.0, 3.0, 5.0]), dst)
    got = map_scores(src[shuffled], np.array([5.0, 1.0, 3.0]), dst)
    np.testing.assert_array_equal(got, want)
    assert want.tolist()[1:3] == [2.0, 5.0]


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


def ragged(*rows: list[float]) -> Ragged:
    return Ragged.from_rows([np.array(r) for r in rows], np.float32)


def test_keep_count_is_exact() -> None:
    assert [keep_count(0.3, 10), keep_count(0.5, 5), keep_count(5 / 7, 7)] == [3, 3, 5]
    with pytest.raises(ConfigError, match="token-keep"):
        keep_count(0.0, 4)


def test_sample_and_global_ranking_by_hand() -> None:
    # The last token of each row is its EOS: lowest score, kept anyway.
    scores = ragged([9, 8, 7, -9], [1, 0, -1, -9])
    by_sample = select_response_tokens(scores, 0.5, "sample")
    assert [r.tolist() for r in by_sample.rows()] == [[1, 0, 0, 1], [1, 0, 0, 1]]
    # One cut over 8 tokens: 4 kept = two EOS + the two best overall (both in row 0).
    by_global = select_response_tokens(scores, 0.5, "global")
    assert [r.tolist() for r in by_global.rows()] == [[1, 1, 0, 1], [0, 0, 0, 1]]


def test_ties_nan_and_budget_rules() -> None:
    # Ties: the earlier token wins within a row, the earlier row wins across rows.
    assert select_response_tokens(ragged([2, 2, 2, 0]), 0.5)[0].tolist() == [1, 0, 0, 1]
    ties = select_response_tokens(ragged([1, 0], [1, 0]), 0.75, "global")
    assert [r.tolist() for r in ties.rows()] == [[1, 1], [0, 1]]
    # A nan score (no evidence) is kept, and counts towards the budget.
    assert select_response_tokens(ragged([np.nan, 5, 4, 0]), 0.25)[0].tolist() == [1, 0, 0, 1]
    # keep = 1: everything.
    assert select_response_tokens(ragged([3, 1, 2]), 1.0)[0].tolist() == [1, 1, 1]
    with pytest.raises(ConfigError, match="token-rank"):
        select_response_tokens(ragged([1.0]), 0.5, "row")


def paris_scores(tok: Any, data: TokenizedData, response: str) -> Ragged:
    """1 on the tokens inside "Paris", 0 elsewhere, 0 on EOS (row 0 of ``data``)."""
    spans = response_offsets(tok, response)
    start = response.index("Paris")
    inside = (spans[:, 0] >= start - 1) & (spans[:, 1] <= start + 5)
    return Ragged.from_rows([np.append(inside.astype(float), 0.0)], np.float32)


def test_masks_line_up_with_tokens_decode_round_trip(tok: Any, data: TokenizedData) -> None:
    scores = paris_scores(tok, data, PAIRS[0][1])
    n = len(scores.values)
    flags = select_response_tokens(scores, 4 / n)  # "ĠP", "ari", "s" and EOS
    (mask,) = full_masks(data, [0], flags)
    ids, labels = data.input_ids[0], data.labels[0]
    assert len(mask) == len(ids)
    assert all(m == 1 for m, lab in zip(mask, labels, strict=True) if lab == IGNORE_INDEX)
    kept = [t for t, m, lab in zip(ids, mask, labels, strict=True) if m and lab != IGNORE_INDEX]
    assert tok.decode(kept) == " Paris<eos>"


def test_masks_across_tokenizers_round_trip() -> None:
    """Scores on the 300-vocab tokens, masks on the 400-vocab tokens: still " Paris"."""
    small, target = tiny_tokenizer(vocab_size=300), tiny_tokenizer(vocab_size=400)
    prompt, response = PAIRS[0]
    t_data = tokenize_pairs(target, [prompt], [response], max_length=64)
    s_data = tokenize_pairs(small, [prompt], [response], max_length=64)
    s_scores = paris_scores(small, s_data, response)[0]
    assert len(s_scores) == s_data.n_response_tokens[0]
    mapped = map_scores(
        response_offsets(small, response), s_scores[:-1], response_offsets(target, response)
    )
    scores = Ragged.from_rows([np.append(mapped, s_scores[-1])], np.float32)
    flags = select_response_tokens(scores, 4 / len(scores.values))
    (mask,) = full_masks(t_data, [0], flags)
    ids, labels = t_data.input_ids[0], t_data.labels[0]
    kept = [t for t, m, lab in zip(ids, mask, labels, strict=True) if m and lab != IGNORE_INDEX]
    assert target.decode(kept) == " Paris<eos>"


def random_masks(data: TokenizedData, rows: list[int], keep: float, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    scores = Ragged.from_rows([rng.normal(size=data.n_response_tokens[i]) for i in rows], "f4")
    return full_masks(data, rows, select_response_tokens(scores, keep))


def test_eos_always_kept_and_prompt_untouched(data: TokenizedData) -> None:
    rows = list(range(len(data)))
    rng = np.random.default_rng(1)
    # EOS scores far below every other token's.
    raw = [np.append(rng.uniform(1, 2, data.n_response_tokens[i] - 1), -100.0) for i in rows]
    for rank in ("sample", "global"):
        flags = select_response_tokens(Ragged.from_rows(raw, np.float32), 0.01, rank)
        for i, mask in zip(rows, full_masks(data, rows, flags), strict=True):
            assert mask[-1] == 1 and data.input_ids[i][-1] == data.pad_token_id  # EOS id
            prompt = [m for m, lab in zip(mask, data.labels[i], strict=True) if lab == -100]
            assert all(prompt)


def test_collate_masks_exactly_the_dropped_tokens(data: TokenizedData) -> None:
    rows = [4, 1, 3]
    masks = random_masks(data, rows, 0.5)
    sub = attach_token_masks(data, rows, masks)
    batch = collate(sub, range(len(rows)))
    for k, i in enumerate(rows):
        n = len(data.input_ids[i])
        got = batch["labels"][k, :n].tolist()
        want = [lab if m else IGNORE_INDEX for lab, m in zip(data.labels[i], masks[k], strict=True)]
        assert got == want
        dropped = sum(1 for lab, m in zip(data.labels[i], masks[k], strict=True) if not m)
        assert dropped == data.n_response_tokens[i] - sum(g != IGNORE_INDEX for g in got) > 0
    assert export_labels(data, masks, rows) == [
        batch["labels"][k, : len(data.input_ids[i])].tolist() for k, i in enumerate(rows)
    ]


def test_keep_one_reproduces_sample_level_training_bit_for_bit(
    tok: Any, data: TokenizedData
) -> None:
    rows = list(range(len(data)))
    settings = TrainSettings(epochs=2, learning_rate=5e-3, batch_size=2, seed=3)
    lora = LoraSettings(r=4, alpha=8, dropout=0.1)

    def tuned(train_data: TokenizedData) -> dict[str, torch.Tensor]:
        model = attach_lora(tiny_causal_lm(len(tok), seed=0), lora, seed=0)
        finetune(model, train_data, settings)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    ones = random_masks(data, rows, 1.0)
    assert all(all(m) for m in ones)
    plain = tuned(data.subset(rows))
    masked = tuned(attach_token_masks(data, rows, ones))
    assert plain.keys() == masked.keys()
    assert all(torch.equal(plain[k], masked[k]) for k in plain)
    half = tuned(attach_token_masks(data, rows, random_masks(data, rows, 0.5)))
    assert not all(torch.equal(plain[k], half[k]) for k in plain)


def test_token_masks_sidecar_round_trip(tmp_path: Path, data: TokenizedData) -> None:
    rows = [0, 3]
    masks = random_masks(data, rows, 0.5)
    path = tmp_path / "token_masks.npz"
    save_token_masks(path, masks, rows)
    indices, back = load_token_masks(path)
    assert indices.tolist() == rows and back == masks
    np.savez(tmp_path / "other.npz", values=np.zeros(2), offsets=np.array([0, 2]))
    with pytest.raises(DataError, match="not a speccore token_masks"):
        load_token_masks(tmp_path / "other.npz")
    with pytest.raises(DataError, match="another tokenizer"):
        attach_token_masks(data, [1, 2], masks)  # masks of rows 0 and 3


def test_token_labels_jsonl_trains_the_kept_tokens_with_hf_collator(
    tmp_path: Path, tok: Any, data: TokenizedData
) -> None:
    """The README recipe: token_labels.jsonl through transformers' DataCollatorForSeq2Seq gives
    HF's own loss over exactly the tokens speccore's masked fine-tune learns."""
    from transformers import DataCollatorForSeq2Seq

    from speccore.scoring.losses import response_loss

    rows = [4, 0, 2]
    masks = random_masks(data, rows, 0.5, seed=3)
    path = tmp_path / "token_labels.jsonl"
    save_token_labels(path, data, masks, rows)
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    assert ds["index"] == rows and ds["labels"] == export_labels(data, masks, rows)
    assert ds["input_ids"] == [data.input_ids[i] for i in rows]
    for labels, completion in zip(ds["labels"], ds["completion_mask"], strict=True):
        assert completion == [int(t != IGNORE_INDEX) for t in labels]
    dropped = sum(m.count(0) for m in masks)
    assert dropped > 0  # some response tokens are really dropped
    pad_right = tiny_tokenizer()  # the fixture's twin, padding on the right like speccore
    pad_right.padding_side = "right"
    collator = DataCollatorForSeq2Seq(pad_right, label_pad_token_id=IGNORE_INDEX)
    batch = collator([{k: r[k] for k in ("input_ids", "labels")} for r in ds])
    model = tiny_causal_lm(len(tok), seed=4).double()
    with torch.no_grad():
        hf_loss = model(**batch).loss.item()
        masked = collate(attach_token_masks(data, rows, masks), list(range(len(rows))))
        n_learned = int((masked["labels"][:, 1:] != IGNORE_INDEX).sum())
        ours = (response_loss(model, masked).total / n_learned).item()
    assert n_learned == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    # float64; transformers' loss over every position against ours over the response window:
    # other sums in the forward pass over rows of up to 64 tokens.
    assert hf_loss == pytest.approx(ours, rel=model_tol(model, 64))


# ---------------------------------------------------------------------------------------------
# select_tokens on a real provider (tiny models)
# ---------------------------------------------------------------------------------------------


def provider_for(model_dirs: dict[str, Path], n: int = 12, **kw: Any) -> ModelProvider:
    from conftest import make_rows, tiny_select_config

    settings: dict[str, Any] = {"max_length": 48, "token_keep": 0.5, **kw}
    cfg = tiny_select_config(Path("unused"), model_dirs, **settings)
    cfg.validate()
    return ModelProvider(cfg, datasets.Dataset.from_list(make_rows(n)))


def coreset(n: int, kept: list[int]) -> Selection:
    return Selection("random", np.array(kept), n_total=n, budget=len(kept))


class Spy:
    """Records which rows each fine-tune saw and which adapter scored which rows."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, provider: ModelProvider) -> None:
        import speccore.train as train

        self.trained: dict[str, set[int]] = {}  # adapter fingerprint → rows it was tuned on
        self.scored: list[tuple[str, list[int]]] = []
        self.finetunes = 0
        row_of = {tuple(x): i for i, x in enumerate(provider.small.data.input_ids)}
        real_finetune, real_losses = train.finetune, token_selection.token_losses_of

        def finetune(model, data, settings, **kw):  # type: ignore[no-untyped-def]
            out = real_finetune(model, data, settings, **kw)
            self.finetunes += 1
            self.trained[adapter_fingerprint(model)] = {row_of[tuple(x)] for x in data.input_ids}
            return out

        def token_losses_of(model, data, indices, **kw):  # type: ignore[no-untyped-def]
            self.scored.append((adapter_fingerprint(model), [int(i) for i in indices]))
            return real_losses(model, data, indices, **kw)

        monkeypatch.setattr(train, "finetune", finetune)
        monkeypatch.setattr(token_selection, "token_losses_of", token_losses_of)


def test_crossfit_scores_each_half_with_the_other_adapter(
    model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    provider = provider_for(model_dirs)
    fresh = adapter_fingerprint(provider.small.use_fresh())
    spy = Spy(monkeypatch, provider)
    kept = [0, 2, 3, 5, 7, 8, 10, 11]
    sel = select_tokens(provider, coreset(12, kept), provider.config)
    assert sel.info["crossfit"] is True and spy.finetunes == 2
    # The halves are timed apart from STAFF's own small fine-tune (none ran here).
    assert provider.timer.timings.get("token cross-fit fine-tune", 0) > 0
    assert "small fine-tune" not in provider.timer.timings
    halves = list(spy.trained.values())
    assert (
        len(halves) == 2 and not halves[0] & halves[1] and halves[0] | halves[1] == set(range(12))
    )
    tuned_calls = [(fp, rows) for fp, rows in spy.scored if fp in spy.trained]
    assert len(tuned_calls) == 2
    for fp, rows in tuned_calls:
        assert rows and not set(rows) & spy.trained[fp]  # never scores its own training rows
    assert sorted(r for _, rows in tuned_calls for r in rows) == kept
    assert [rows for fp, rows in spy.scored if fp == fresh] == [kept]  # ℓ_base, untuned
    # Masks in the target's tokens; the slot is left resettable to its fresh adapter.
    assert [len(m) for m in sel.masks] == [len(provider.target.data.input_ids[i]) for i in kept]
    assert 0.5 <= sel.info["kept_fraction"] < 1
    assert adapter_fingerprint(provider.small.use_fresh()) == fresh
    sel.save(tmp_path, provider.target.data)
    assert load_token_masks(tmp_path / "token_masks.npz")[1] == sel.masks
    exported = (tmp_path / "token_labels.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in exported] == kept
    # A rerun (another keep fraction) takes both half adapters from the cache.
    again = provider_for(model_dirs, token_keep=0.3, token_rank="global")
    spy2 = Spy(monkeypatch, again)
    select_tokens(again, coreset(12, kept), again.config)
    assert spy2.finetunes == 0


def test_no_crossfit_reuses_the_staff_adapter(
    model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = provider_for(model_dirs, token_crossfit=False)
    spy = Spy(monkeypatch, provider)
    sel = select_tokens(provider, coreset(12, [1, 4, 9]), provider.config)
    assert sel.info["crossfit"] is False and "no-token-crossfit" in sel.info["crossfit_off_reason"]
    ((rows,),) = [tuple(v for v in spy.trained.values())]
    assert rows == set(range(12))  # the one full-data (STAFF) fine-tune
    assert provider.small.tuned_adapter_dir is not None


@pytest.mark.filterwarnings("ignore:.*different tokenizers:UserWarning")
@pytest.mark.parametrize("scorer", ["small", "target"])
def test_other_family_target_gets_masks_in_its_own_tokens(
    model_dirs: dict[str, Path], scorer: str
) -> None:
    provider = provider_for(
        model_dirs, target=str(model_dirs["other"]), token_scorer=scorer, token_keep=0.4
    )
    kept = [0, 1, 4, 6, 9]
    sel = select_tokens(provider, coreset(12, kept), provider.config)
    target, small = provider.target.data, provider.small.data
    assert any(target.labels[i] != small.labels[i] for i in kept)  # really another tokenizer
    assert sel.info["scorer"] == scorer and sel.scores is not None
    for k, i in enumerate(kept):
        assert len(sel.masks[k]) == len(target.input_ids[i])
        assert len(sel.scores[k]) == target.n_response_tokens[i]
        assert sel.masks[k][-1] == 1  # EOS
        n = int(target.n_response_tokens[i])
        assert sum(sel.masks[k]) - (len(sel.masks[k]) - n) >= keep_count(0.4, n)


def test_keep_one_scores_nothing(
    model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = provider_for(model_dirs, token_keep=1.0)
    spy = Spy(monkeypatch, provider)
    sel = select_tokens(provider, coreset(12, [2, 5]), provider.config)
    assert spy.finetunes == 0 and not spy.scored and sel.scores is None
    assert all(all(m) for m in sel.masks) and sel.info["kept_fraction"] == 1.0


def test_config_validation() -> None:
    for bad, flag in [
        ({"token_keep": 0.0}, "--token-keep"),
        ({"token_keep": 1.5}, "--token-keep"),
        ({"token_scorer": "tiny"}, "--token-scorer"),
        ({"token_rank": "row"}, "--token-rank"),
    ]:
        with pytest.raises(ConfigError, match=flag):
            SelectConfig.from_dict(dict(data="x", **bad)).validate()
    from speccore.cli import build_parser

    args = build_parser().parse_args(["select", "--data", "x", "--no-token-crossfit"])
    assert args.token_crossfit is False
