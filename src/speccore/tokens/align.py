"""Carry per-token scores from one tokenizer's tokens to another's, through character offsets.

The scores come from the small model, the masks apply to the target's tokens, and the two
tokenizers may cut the same response differently ("ari" vs "a" + "ri"). Both tokenisations are
tied to the response *text*: each token covers a character span ``[start, end)`` of it (the fast
tokenizers' ``return_offsets_mapping``). A target token's score is the mean of the scores of the
small-model tokens whose spans overlap its own. A target token that overlaps none (a zero-width
special token) gets ``nan``, which the mask builder keeps: there is no evidence to drop it. The
end-of-sequence token has no span at all; callers map EOS to EOS explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..utils.errors import ModelError


def response_offsets(tokenizer: Any, response_text: str) -> np.ndarray:
    """Character spans ``[n, 2]`` (int64) of the response's tokens, as training tokenises it.

    Tokenises like :func:`speccore.data.tokenize_pairs` does a response: without special
    tokens, dropping a leading BOS or trailing EOS the tokenizer adds regardless. The appended
    EOS of the training sequence is *not* included (it has no span).
    """
    return response_offsets_batch(tokenizer, [response_text])[0]


def response_offsets_batch(tokenizer: Any, texts: Sequence[str]) -> list[np.ndarray]:
    """:func:`response_offsets` for many texts in one tokenizer call."""
    ids, offsets = response_tokens_batch(tokenizer, texts)
    del ids
    return offsets


def response_tokens_batch(
    tokenizer: Any, texts: Sequence[str]
) -> tuple[list[list[int]], list[np.ndarray]]:
    """Token ids and character spans of each response text (see :func:`response_offsets`)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(
            "token-level selection needs a fast tokenizer (character offsets); this model's "
            "tokenizer is a slow one"
        )
    if not texts:
        return [], []
    enc = tokenizer(
        list(texts), add_special_tokens=False, return_offsets_mapping=True, return_tensors=None
    )
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    all_ids: list[list[int]] = []
    all_offsets: list[np.ndarray] = []
    for ids, offs in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        ids, spans = list(ids), [tuple(o) for o in offs]
        # Same stripping as speccore.data.encode._bare_response, so positions line up.
        if bos is not None and ids and ids[0] == bos:
            ids, spans = ids[1:], spans[1:]
        if ids and ids[-1] == eos:
            ids, spans = ids[:-1], spans[:-1]
        all_ids.append(ids)
        all_offsets.append(np.asarray(spans, dtype=np.int64).reshape(-1, 2))
    return all_ids, all_offsets


def map_scores(
    src_offsets: np.ndarray, src_scores: np.ndarray, dst_offsets: np.ndarray
) -> np.ndarray:
    """Scores of the ``dst`` tokens: the mean score of the ``src`` tokens overlapping each one.

    Spans ``[start, end)`` overlap when ``max(starts) < min(ends)``. Source tokens without a
    span (``start == end``) or without a finite score take no part; a ``dst`` token overlapping
    no source token gets ``nan``. Identical spans map one to one (the same tokenizer: the scores
    come back unchanged). Returns float64 of length ``len(dst_offsets)``.
    """
    src = _spans(src_offsets, "src_offsets")
    dst = _spans(dst_offsets, "dst_offsets")
    scores = np.asarray(src_scores, dtype=np.float64).reshape(-1)
    if len(scores) != len(src):
        raise ValueError(f"{len(src)} source spans but {len(scores)} source scores")
    if np.array_equal(src, dst):
        return scores.copy()
    usable = (src[:, 1] > src[:, 0]) & np.isfinite(scores)
    src, scores = src[usable], scores[usable]
    wide = dst[:, 1] > dst[:, 0]  # a zero-width dst token overlaps nothing
    if _in_order(src):
        lo, hi = _overlap_ranges(src, dst)
        return _segment_means(scores, lo, np.where(wide, np.maximum(hi - lo, 0), 0))
    return _pairwise_means(src, scores, dst, wide)


def _spans(offsets: np.ndarray, name: str) -> np.ndarray:
    spans = np.asarray(offsets, dtype=np.int64)
    if spans.size == 0:
        return spans.reshape(0, 2)
    if spans.ndim != 2 or spans.shape[1] != 2:
        raise ValueError(f"{name} must have shape [n, 2], got {spans.shape}")
    return spans


def _in_order(spans: np.ndarray) -> bool:
    """Whether starts and ends are non-decreasing (what tokenizers produce, left to right)."""
    return bool(np.all(np.diff(spans[:, 0]) >= 0) and np.all(np.diff(spans[:, 1]) >= 0))


def _overlap_ranges(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each dst span, the half-open range ``[lo, hi)`` of the (ordered) src tokens
    overlapping it: those ending after the dst start, and starting before the dst end."""
    lo = np.searchsorted(src[:, 1], dst[:, 0], side="right")
    hi = np.searchsorted(src[:, 0], dst[:, 1], side="left")
    return lo, hi


def _pairwise_means(
    src: np.ndarray, scores: np.ndarray, dst: np.ndarray, wide: np.ndarray
) -> np.ndarray:
    """The exact quadratic route, for spans out of order (unusual normalisers)."""
    overlap = (src[None, :, 0] < dst[:, None, 1]) & (src[None, :, 1] > dst[:, None, 0])
    overlap &= wide[:, None]
    counts = overlap.sum(axis=1)
    sums = np.where(overlap, scores[None, :], 0.0).sum(axis=1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _segment_means(values: np.ndarray, lo: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean of ``values[lo[i] : lo[i] + counts[i]]`` per i (``nan`` where the count is 0).

    Sums with ``np.add.reduceat`` over the gathered segments: a single-token segment returns its
    value exactly, so one-to-one stretches of two tokenisations keep their scores bit for bit.
    """
    out = np.full(len(lo), np.nan, dtype=np.float64)
    has = counts > 0
    if not has.any():
        return out
    cnt = counts[has]
    seg_start = np.cumsum(cnt) - cnt
    gather = np.repeat(lo[has] - seg_start, cnt) + np.arange(int(cnt.sum()))
    out[has] = np.add.reduceat(values[gather], seg_start) / cnt
    return out
