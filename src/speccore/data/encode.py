"""Tokenise (prompt, response) pairs into :class:`TokenizedData` with labels on the response only.

The prompt and the response are tokenised separately: the prompt with the tokenizer's special
tokens (a BOS where the model expects one), the response without (Gemma's tokenizer adds a BOS
on every call, and a BOS inside the labels would teach the model to emit it mid-answer). An EOS
is appended to the response and labelled, so the model learns to stop; neither packaged
tokenizer appends one itself.

:func:`encode_prompts` and :func:`truncate_prompt` are the one prompt encoder: training rows
(:func:`tokenize_pairs`) and generation prompts (:func:`speccore.bench.generate.generate`) both
go through them, so a fine-tuned model is prompted at evaluation exactly as it was trained.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import datasets

from ..utils.errors import ConfigError, DataError, ModelError
from ..utils.progress import progress
from .batches import IGNORE_INDEX, TokenizedData
from .read import row_label
from .template import Formatting, format_rows

logger = logging.getLogger(__name__)

TRUNCATION_SIDES = ("left", "right")
# Rows per tokenizer call: large enough for the fast tokenizer's batching, small enough to show
# progress and keep memory flat.
_CHUNK = 2048
# BOS + at least one response token + EOS.
_MIN_LENGTH = 3


def tokenize_pairs(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int,
    truncation_side: str = "left",
    desc: str = "tokenize",
) -> TokenizedData:
    """Tokenise each ``prompt + response`` with ``labels`` = ``-100`` on the prompt.

    Rows longer than ``max_length`` lose prompt tokens (from the left by default, keeping a
    leading BOS; ``truncation_side="right"`` cuts the prompt's end). The response is never
    dropped: if it alone is too long, the row keeps the BOS and the response's first tokens,
    with EOS still last (logged once, with a count). Raises :class:`DataError` for a response
    that is empty after tokenisation.
    """
    _check_args(prompts, responses, max_length, truncation_side)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ModelError("the tokenizer has no EOS token; speccore needs one to end responses")
    bos = tokenizer.bos_token_id
    counts = {"prompt": 0, "response": 0}
    input_ids: list[list[int]] = []
    labels: list[list[int]] = []
    n = len(prompts)
    chunks = range(0, n, _CHUNK)
    for start in progress(chunks, desc=desc, unit="chunk", disable=n <= _CHUNK, leave=False):
        stop = min(start + _CHUNK, n)
        p_batch = encode_prompts(tokenizer, prompts[start:stop])
        r_batch = tokenizer(list(responses[start:stop]), add_special_tokens=False)["input_ids"]
        for row, prompt, r_ids in zip(range(start, stop), p_batch, r_batch, strict=True):
            response = _bare_response(list(r_ids), bos, eos)
            if not response:
                raise DataError(
                    f"{row_label(row)}: response is empty after tokenisation; give it some text "
                    "or drop the row"
                )
            prompt, response, cut = _fit(prompt, [*response, eos], bos, max_length, truncation_side)
            if cut:
                counts[cut] += 1
            input_ids.append(prompt + response)
            labels.append([IGNORE_INDEX] * len(prompt) + response)
    _log_truncation(counts, n, max_length)
    pad = tokenizer.pad_token_id
    return TokenizedData(
        input_ids=input_ids, labels=labels, pad_token_id=eos if pad is None else pad
    )


def tokenize_dataset(
    dataset: datasets.Dataset,
    tokenizer: Any,
    fmt: Formatting,
    max_length: int,
    truncation_side: str = "left",
) -> TokenizedData:
    """:func:`format_rows` then :func:`tokenize_pairs`: rows to training tokens."""
    prompts, responses = format_rows(dataset, fmt, tokenizer)
    return tokenize_pairs(tokenizer, prompts, responses, max_length, truncation_side)


def encode_prompts(
    tokenizer: Any,
    prompts: Sequence[str],
    max_prompt_tokens: int | None = None,
    truncation_side: str = "left",
) -> list[list[int]]:
    """Token ids of prompt texts, exactly as training rows start.

    The tokenizer's special tokens are added (a BOS where the model expects one), repeated
    leading BOS tokens are dropped (a chat template that writes its own BOS text plus the
    tokenizer's BOS gives two), and, with ``max_prompt_tokens``, each prompt is cut to that many
    tokens by :func:`truncate_prompt` (logged once, with a count).
    """
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ConfigError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    if truncation_side not in TRUNCATION_SIDES:
        raise ConfigError(f"--truncation-side must be 'left' or 'right', got '{truncation_side}'")
    bos = tokenizer.bos_token_id
    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    out = [_single_bos(list(ids), bos) for ids in encoded]
    if max_prompt_tokens is None:
        return out
    n_cut = sum(len(ids) > max_prompt_tokens for ids in out)
    if n_cut:
        logger.info(
            "%d of %d prompts longer than %d tokens: truncated (%s)",
            n_cut,
            len(out),
            max_prompt_tokens,
            truncation_side,
        )
    return [truncate_prompt(ids, bos, max_prompt_tokens, truncation_side) for ids in out]


def truncate_prompt(ids: list[int], bos: int | None, keep: int, side: str = "left") -> list[int]:
    """``ids`` cut to at most ``keep`` tokens from ``side``, keeping a leading BOS.

    ``side="left"`` drops the oldest tokens (the prompt's end, nearest the response, stays);
    ``"right"`` drops the end. A leading BOS survives any cut that leaves room for it.
    """
    if len(ids) <= keep:
        return ids
    head = ids[:1] if bos is not None and keep >= 1 and ids[:1] == [bos] else []
    body = ids[len(head) :]
    room = keep - len(head)
    return head + (body[len(body) - room :] if side == "left" else body[:room])


def _check_args(
    prompts: Sequence[str], responses: Sequence[str], max_length: int, truncation_side: str
) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise DataError("no rows to tokenise; the data has no rows")
    if max_length < _MIN_LENGTH:
        raise ConfigError(
            f"--max-length {max_length} is too small; it must be at least {_MIN_LENGTH} "
            "(BOS, one response token, EOS)"
        )
    if truncation_side not in TRUNCATION_SIDES:
        raise ConfigError(f"--truncation-side must be 'left' or 'right', got '{truncation_side}'")


def _single_bos(ids: list[int], bos: int | None) -> list[int]:
    """Drop repeated leading BOS tokens.

    A chat template that writes its own BOS text (Gemma's does) plus the tokenizer's added BOS
    would otherwise start the prompt with two.
    """
    while bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids


def _bare_response(ids: list[int], bos: int | None, eos: int) -> list[int]:
    """Response ids without a leading BOS or trailing EOS a tokenizer may add regardless.

    Some tokenizers (slow Llama-style ones with ``add_bos_token``/``add_eos_token``) add them
    even with ``add_special_tokens=False``; the EOS is appended by the caller, exactly once.
    """
    if bos is not None and ids and ids[0] == bos:
        ids = ids[1:]
    if ids and ids[-1] == eos:
        ids = ids[:-1]
    return ids


def _fit(
    prompt: list[int], response: list[int], bos: int | None, max_length: int, side: str
) -> tuple[list[int], list[int], str | None]:
    """Truncate to ``max_length``: ``(prompt, response, what was cut or None)``.

    ``response`` already ends with EOS. The prompt goes first (:func:`truncate_prompt`); the
    response is shortened only when it alone does not fit, and then keeps its start and the EOS.
    """
    if len(prompt) + len(response) <= max_length:
        return prompt, response, None
    head = prompt[:1] if bos is not None and prompt[:1] == [bos] else []
    room = max_length - len(response)
    if room >= len(head):
        return truncate_prompt(prompt, bos, room, side), response, "prompt"
    n_tokens = max_length - len(head) - 1  # >= 1 as max_length >= _MIN_LENGTH
    return head, response[:n_tokens] + response[-1:], "response"


def _log_truncation(counts: dict[str, int], n: int, max_length: int) -> None:
    if counts["prompt"]:
        logger.info(
            "%d of %d rows longer than --max-length %d: prompt truncated",
            counts["prompt"],
            n,
            max_length,
        )
    if counts["response"]:
        logger.warning(
            "%d of %d rows have a response longer than --max-length %d on its own: kept only "
            "its first tokens and EOS, and none of the prompt; raise --max-length",
            counts["response"],
            n,
            max_length,
        )
