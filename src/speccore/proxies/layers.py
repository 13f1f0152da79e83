"""Which layers a derived small model keeps, and the model they make: how many
(:func:`layer_count`), which (evenly spaced, or ShortGPT's block influence on the task's response
tokens), and the decoder rebuilt from the target's kept layers, embeddings, final norm and LM
head (:func:`build_derived`)."""

from __future__ import annotations

import copy
import math
import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batches import IGNORE_INDEX, TokenizedData, collate, length_grouped_batches
from ..models.lora import seeded
from ..scoring.losses import eval_mode, forward, model_device
from ..utils.errors import ConfigError, ModelError
from .agree import sample_rows
from .derive_settings import DeriveSettings, _check_layers

# Config attributes that may have the length of the layer count without being per-layer.
_NOT_PER_LAYER = frozenset({"architectures", "bad_words_ids", "suppress_tokens"})


def layer_count(layers: int | float, total: int) -> int:
    """How many of ``total`` layers ``layers`` keeps: a count, or ``round(f * total)`` (>= 2)."""
    _check_layers(layers)
    if isinstance(layers, float) and not layers.is_integer():
        n = max(2, round(layers * total))
    else:
        n = int(layers)
    if n > total:
        raise ConfigError(f"--layers {layers}: the target has only {total} layers")
    return n


def uniform_layers(total: int, n: int) -> list[int]:
    """``n`` evenly spaced layer indices of ``total``, the first and last always kept.

    ``n == 1`` keeps the first layer only.
    """
    if not 1 <= n <= total:
        raise ConfigError(f"cannot keep {n} of {total} layers")
    if n == 1:
        return [0]
    step = (total - 1) / (n - 1)
    # floor(x + 0.5), not round(): banker's rounding could map two points to one layer.
    kept = [math.floor(i * step + 0.5) for i in range(n)]
    assert len(set(kept)) == n and kept[-1] == total - 1
    return kept


def block_influence(
    model: nn.Module,
    data: TokenizedData,
    *,
    indices: np.ndarray | None = None,
    max_batch_tokens: int = 4096,
) -> np.ndarray:
    """``BI_l = 1 - mean cos(x_l, y_l)`` for every decoder layer ``l``, float64 ``[L]``.

    ``x_l`` and ``y_l`` are the hidden states entering and leaving layer ``l`` (forward hooks on
    the blocks, so the last layer's output is taken before the final norm); the mean runs over
    every response token (``labels != -100``) of the rows at ``indices`` (all rows when None),
    pooled, so a long response weighs per token.
    """
    layers = decoder_layers(model)
    idx = np.arange(len(data)) if indices is None else np.asarray(indices, dtype=np.int64)
    cos_sum = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    current: dict[str, Tensor] = {}

    def hook(layer_index: int) -> Any:
        def record(_module: nn.Module, args: tuple[Any, ...], kwargs: dict, out: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            mask = current["mask"]
            cos = F.cosine_similarity(x[mask].float(), y[mask].float(), dim=-1)
            cos_sum[layer_index] += cos.double().sum().cpu()

        return record

    handles = [
        layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    device = model_device(model)
    try:
        with torch.inference_mode(), eval_mode(model):
            for piece in length_grouped_batches(data.lengths, max_batch_tokens, indices=idx):
                batch = {k: v.to(device) for k, v in collate(data, piece).items()}
                current["mask"] = batch["labels"] != IGNORE_INDEX
                count += int(current["mask"].sum())
                # The blocks only: the LM head's logits are not needed.
                forward(getattr(model, "base_model", model), batch)
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ConfigError("block influence needs response tokens; the data has none")
    return 1.0 - (cos_sum / count).numpy()


def select_layers(
    model: nn.Module,
    settings: DeriveSettings,
    data: TokenizedData | None,
    max_batch_tokens: int = 4096,
) -> tuple[list[int], np.ndarray | None]:
    """The kept layer indices (ascending) and, for ``block-influence``, every layer's BI."""
    total = len(decoder_layers(model))
    n = layer_count(settings.layers, total)
    if settings.layer_selection == "uniform":
        return uniform_layers(total, n), None
    if data is None:
        raise ConfigError("--layer-selection block-influence needs the task's training data")
    rows = sample_rows(len(data), settings.bi_rows, settings.seed)
    bi = block_influence(model, data, indices=rows, max_batch_tokens=max_batch_tokens)
    # Highest BI first; a stable sort breaks ties towards the earlier layer.
    order = np.argsort(-bi, kind="stable")
    return sorted(int(i) for i in order[:n]), bi


def build_derived(target_model: nn.Module, kept: list[int]) -> Any:
    """A float32 copy of ``target_model`` holding only the decoder layers ``kept`` (in order).

    A fresh model of the trimmed config (:func:`derived_config`) gets the kept blocks' weights
    and everything outside the blocks (embeddings, final norm, LM head), on the target's device,
    in eval mode. Layer ``j`` of the result is layer ``kept[j]`` of the target.
    """
    from transformers import AutoModelForCausalLM

    _refuse_adapter(target_model)
    prefix = _layers_prefix(target_model)
    config, _ = derived_config(target_model.config, kept)
    with seeded(0):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    position = {old: new for new, old in enumerate(kept)}
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    state: dict[str, Tensor] = {}
    for name, tensor in target_model.state_dict().items():
        match = pattern.match(name)
        if match is None:
            state[name] = tensor
        elif int(match.group(1)) in position:
            state[f"{prefix}.{position[int(match.group(1))]}.{match.group(2)}"] = tensor
    model.load_state_dict(state, strict=True)
    generation = getattr(target_model, "generation_config", None)
    if generation is not None:
        model.generation_config = copy.deepcopy(generation)
    model.to(model_device(target_model))
    model.eval()
    return model


def derived_config(config: Any, kept: list[int]) -> tuple[Any, list[str]]:
    """A copy of ``config`` for the layers ``kept``, and the names of the lists it trimmed.

    ``num_hidden_layers`` becomes ``len(kept)``; every list attribute as long as the old layer
    count (Gemma 3's ``layer_types``, per-layer sizes) keeps the entries of ``kept``. For a
    composite config (text + vision) the text config is the one trimmed.
    """
    new = copy.deepcopy(config)
    text = new.get_text_config() if hasattr(new, "get_text_config") else new
    total = int(text.num_hidden_layers)
    if any(not 0 <= i < total for i in kept) or sorted(set(kept)) != list(kept) or not kept:
        raise ConfigError(
            f"kept layers {kept} are not ascending, distinct indices of 0..{total - 1}"
        )
    trimmed = []
    for name, value in list(vars(text).items()):
        if not isinstance(value, list | tuple) or len(value) != total or _not_per_layer(name):
            continue
        setattr(text, name, type(value)(value[i] for i in kept))
        trimmed.append(name)
    text.num_hidden_layers = len(kept)
    new.dtype = torch.float32
    return new, trimmed


def _not_per_layer(name: str) -> bool:
    """Lists that can be as long as the layer count by chance (token ids, class names)."""
    return name in _NOT_PER_LAYER or "token" in name


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (the ``ModuleList`` of ``num_hidden_layers``)."""
    return model.get_submodule(_layers_prefix(model))  # type: ignore[return-value]


def _layers_prefix(model: nn.Module) -> str:
    """The module path of the blocks, e.g. ``model.layers``."""
    config: Any = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    total = getattr(config, "num_hidden_layers", None)
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and name.split(".")[-1] in ("layers", "h", "blocks")
        and (total is None or len(module) == total)
    ]
    if len(found) != 1:
        raise ModelError(
            f"cannot find the decoder layers of {type(model).__name__} (found {found or 'none'}); "
            "layer dropping supports models with one list of num_hidden_layers blocks"
        )
    return found[0]


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _refuse_adapter(model: nn.Module) -> None:
    if hasattr(model, "peft_config") or any("lora_" in n for n, _ in model.named_parameters()):
        raise ModelError(
            "the target carries a LoRA adapter; derive from the plain model (before attach_lora), "
            "or pass the target's name"
        )
