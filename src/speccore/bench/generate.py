"""Batched greedy generation with left padding, decoding only the new tokens.

Prompts are tokenised by the training tokeniser's own prompt encoder
(:func:`speccore.data.encode.encode_prompts`: the tokenizer's special tokens, a single leading
BOS, the same truncation) so that a fine-tuned model sees at evaluation exactly the prompt form
it learned on. Batches come from the same loop as scoring and training
(:class:`speccore.data.batches.BatchLoop`), padded on the left.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..data import encode as tokenize
from ..data.batches import IGNORE_INDEX, BatchLoop, TokenizedData, length_grouped_batches
from ..scoring.losses import accepts_logits_to_keep, forward_parameters, position_ids
from ..utils import interrupt
from ..utils.errors import ConfigError, DataError, ModelError

logger = logging.getLogger(__name__)


def encode_prompts(
    tokenizer: Any, prompts: Sequence[str], max_prompt_tokens: int, truncation_side: str = "left"
) -> list[list[int]]:
    """Token ids of each prompt as training encodes prompts (special tokens, one leading BOS),
    at most ``max_prompt_tokens`` (cut from ``truncation_side``, keeping the BOS); see
    :func:`speccore.data.encode.encode_prompts`. An empty prompt raises :class:`DataError`."""
    if max_prompt_tokens < 1:
        raise ConfigError(f"generation.max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    out = tokenize.encode_prompts(tokenizer, prompts, max_prompt_tokens, truncation_side)
    for row, ids in enumerate(out):
        if not ids:
            raise DataError(f"evaluation row {row}: the prompt is empty; give it some text")
    return out


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS (what fine-tuning taught the model to end with) and the model's own
    generation EOS ids (e.g. an instruct model's end-of-turn), without duplicates."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        config_eos = [config_eos]
    for i in config_eos or []:
        if int(i) not in ids:
            ids.append(int(i))
    if not ids:
        raise ModelError("neither the tokenizer nor the model names an EOS token to stop at")
    return ids


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    max_prompt_tokens: int = 512,
    truncation_side: str = "left",
    stop: Sequence[str] = (),
    desc: str = "generate",
) -> list[str]:
    """Greedy continuations of ``prompts`` (in input order), stopped at EOS, new tokens only.
    A row whose text comes to hold one of the ``stop`` strings stops too, and its text is cut
    before the first of them.

    Prompts are batched by length (longest first, so a batch too large for memory fails at
    once, and padding stays small) and padded on the left, so every row's last prompt token is
    the position generation continues from.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ConfigError("generation.max_new_tokens and generation.batch_size must be >= 1")
    encoded = encode_prompts(tokenizer, prompts, max_prompt_tokens, truncation_side)
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    # Longest first, so that a batch too large for memory fails at once; rows of similar length
    # together, so that padding stays small.
    prompts_data = TokenizedData(encoded, [[IGNORE_INDEX] * len(x) for x in encoded], pad)
    plan = length_grouped_batches(
        prompts_data.lengths, sys.maxsize, max_batch_size=batch_size, longest_first=True
    )
    outputs: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        with BatchLoop(
            prompts_data,
            plan,
            device=device,
            padding_side="left",
            desc=desc,
            unit="prompt",
            leave=False,
        ) as loop:
            for batch in loop:
                interrupt.check()  # a cell's predictions are kept only whole: stop at once
                new = greedy_tokens(
                    model,
                    batch.tensors["input_ids"],
                    batch.tensors["attention_mask"],
                    max_new_tokens=max_new_tokens,
                    stops=stops,
                    done=text_stop(tokenizer, stop) if stop else None,
                )
                for i, tokens in zip(batch.samples.tolist(), new, strict=True):
                    outputs[i] = _cut(_decode(tokenizer, tokens, stops), stop)
    finally:
        model.train(was_training)
    return outputs


def greedy_tokens(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    stops: Sequence[int],
    done: Callable[[list[int]], bool] | None = None,
) -> list[list[int]]:
    """Greedy new tokens of each left-padded prompt row, each ending at its first stop token
    (included), once ``done(tokens)`` holds for the row's new tokens, or after
    ``max_new_tokens``.

    The same tokens as ``model.generate(do_sample=False)``, computed for less: a row leaves the
    batch (and its key-value cache) as soon as it stops, where ``generate`` keeps decoding
    finished rows until the last one stops. On a CPU a decoding step of a large-vocabulary
    model is mostly its ``lm_head`` (Gemma 3: 262k x 640 per row), so rows that go on decoding
    after their EOS cost as much as live ones. Positions count real tokens, as in ``generate``.
    """
    mask = attention_mask
    positions = position_ids(mask)
    keep_last = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        **keep_last,
    )
    cache_arg = _cache_argument(model)
    cache = _cache_of(out)
    alive = torch.arange(len(input_ids), device=input_ids.device)  # batch rows still decoding
    last = positions[:, -1]
    stop_ids = torch.tensor(list(stops), device=input_ids.device)
    tokens: list[list[int]] = [[] for _ in range(len(input_ids))]
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        for row, t in zip(alive.tolist(), nxt.tolist(), strict=True):
            tokens[row].append(t)
        going = ~torch.isin(nxt, stop_ids)
        if done is not None:
            ended = [done(tokens[row]) for row in alive.tolist()]
            going &= ~torch.tensor(ended, dtype=torch.bool, device=going.device)
        if step == max_new_tokens - 1 or not bool(going.any()):
            break
        if not bool(going.all()):  # drop the finished rows from the batch and the cache
            keep = going.nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            alive, nxt, mask, last = alive[keep], nxt[keep], mask[keep], last[keep]
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=-1)
        last = last + 1
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=last[:, None],
            use_cache=True,
            **{cache_arg: cache},
        )
        cache = _cache_of(out)
    return tokens


def _cache_argument(model: Any) -> str:
    """The name under which the model's forward takes its key-value cache: ``cache`` in recent
    transformers (which deprecates ``past_key_values``), ``past_key_values`` before."""
    return "cache" if "cache" in forward_parameters(model) else "past_key_values"


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def text_stop(tokenizer: Any, stop: Sequence[str]) -> Callable[[list[int]], bool]:
    """Whether a row's new tokens decode to text holding one of the ``stop`` strings."""

    def done(tokens: list[int]) -> bool:
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        return any(s in text for s in stop)

    return done


def _cut(text: str, stop: Sequence[str]) -> str:
    """``text`` before the first of the ``stop`` strings it holds."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(ends)].strip() if ends else text


def _decode(tokenizer: Any, tokens: list[int], stops: list[int]) -> str:
    """Text of the tokens before the first stop token (:func:`greedy_tokens` ends a row with
    it)."""
    for k, t in enumerate(tokens):
        if t in stops:
            tokens = tokens[:k]
            break
    return str(tokenizer.decode(tokens, skip_special_tokens=True)).strip()
