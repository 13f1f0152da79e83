"""Batched greedy generation with left padding, decoding only the new tokens.

Prompts are tokenised the way training tokenised them (the tokenizer's special tokens, a single
leading BOS) so that a fine-tuned model sees at evaluation exactly the prompt form it learned
on, and is cut to ``max_prompt_tokens`` on the same side as training cuts prompts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError, ModelError

logger = logging.getLogger(__name__)


def encode_prompts(
    tokenizer: Any, prompts: Sequence[str], max_prompt_tokens: int, truncation_side: str = "left"
) -> list[list[int]]:
    """Token ids of each prompt: special tokens as in training, one leading BOS, at most
    ``max_prompt_tokens`` (cut from ``truncation_side``, keeping the BOS)."""
    if max_prompt_tokens < 1:
        raise ConfigError(f"generation.max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    bos = tokenizer.bos_token_id
    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    out = []
    n_cut = 0
    for row, ids in enumerate(encoded):
        ids = list(ids)
        if not ids:
            raise DataError(f"evaluation row {row}: the prompt is empty; give it some text")
        # A chat template that writes its own BOS text plus the tokenizer's BOS gives two.
        while bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]
        if len(ids) > max_prompt_tokens:
            n_cut += 1
            ids = _cut(ids, bos, max_prompt_tokens, truncation_side)
        out.append(ids)
    if n_cut:
        logger.info(
            "%d of %d evaluation prompts longer than %d tokens: truncated (%s)",
            n_cut,
            len(out),
            max_prompt_tokens,
            truncation_side,
        )
    return out


def _cut(ids: list[int], bos: int | None, keep: int, side: str) -> list[int]:
    head = ids[:1] if bos is not None and ids[:1] == [bos] and keep > 1 else []
    body = ids[len(head) :]
    room = keep - len(head)
    return head + (body[len(body) - room :] if side == "left" else body[:room])


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
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
            ids, att = left_pad([encoded[i] for i in batch], pad)
            out = model.generate(
                input_ids=ids.to(device), attention_mask=att.to(device), generation_config=config
            )
            new = out[:, ids.shape[1] :].tolist()
            for i, tokens in zip(batch, new, strict=True):
                outputs[i] = _decode(tokenizer, tokens, stops)
    finally:
        model.train(was_training)
    return outputs


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` with every row right-aligned."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    att = torch.zeros((len(rows), longest), dtype=torch.long)
    for k, r in enumerate(rows):
        if r:
            ids[k, longest - len(r) :] = torch.tensor(r, dtype=torch.long)
            att[k, longest - len(r) :] = 1
    return ids, att


def _decode(tokenizer: Any, tokens: list[int], stops: list[int]) -> str:
    """Text of the tokens before the first stop token (generate pads finished rows after it)."""
    for k, t in enumerate(tokens):
        if t in stops:
            tokens = tokens[:k]
            break
    return str(tokenizer.decode(tokens, skip_special_tokens=True)).strip()
