"""Batched greedy generation with left padding, decoding only the new tokens.

Prompts are tokenised by the training tokeniser's own prompt encoder
(:func:`speccore.data.tokenize.encode_prompts`: the tokenizer's special tokens, a single leading
BOS, the same truncation) so that a fine-tuned model sees at evaluation exactly the prompt form
it learned on. Batches come from the same loop as scoring and training
(:class:`speccore.data.tokenized.BatchLoop`), padded on the left.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

import torch

from ..data import tokenize
from ..data.tokenized import IGNORE_INDEX, BatchLoop, TokenizedData, length_grouped_batches
from ..errors import ConfigError, DataError, ModelError

logger = logging.getLogger(__name__)


def encode_prompts(
    tokenizer: Any, prompts: Sequence[str], max_prompt_tokens: int, truncation_side: str = "left"
) -> list[list[int]]:
    """Token ids of each prompt as training encodes prompts (special tokens, one leading BOS),
    at most ``max_prompt_tokens`` (cut from ``truncation_side``, keeping the BOS); see
    :func:`speccore.data.tokenize.encode_prompts`. An empty prompt raises :class:`DataError`."""
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
    desc: str = "generate",
) -> list[str]:
    """Greedy continuations of ``prompts`` (in input order), stopped at EOS, new tokens only.

    Prompts are batched by length (longest first, so a batch too large for memory fails at
    once, and padding stays small) and padded on the left, so every row's last prompt token is
    the position generation continues from.
    """
    from transformers import GenerationConfig

    if max_new_tokens < 1 or batch_size < 1:
        raise ConfigError("generation.max_new_tokens and generation.batch_size must be >= 1")
    encoded = encode_prompts(tokenizer, prompts, max_prompt_tokens, truncation_side)
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad
    )
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
                ids = batch.tensors["input_ids"]
                out = model.generate(
                    input_ids=ids,
                    attention_mask=batch.tensors["attention_mask"],
                    generation_config=config,
                )
                new = out[:, ids.shape[1] :].tolist()
                for i, tokens in zip(batch.samples.tolist(), new, strict=True):
                    outputs[i] = _decode(tokenizer, tokens, stops)
    finally:
        model.train(was_training)
    return outputs


def _decode(tokenizer: Any, tokens: list[int], stops: list[int]) -> str:
    """Text of the tokens before the first stop token (generate pads finished rows after it)."""
    for k, t in enumerate(tokens):
        if t in stops:
            tokens = tokens[:k]
            break
    return str(tokenizer.decode(tokens, skip_special_tokens=True)).strip()
