"""A small model of the target's own family, derived from the target by dropping layers.

STAFF wants a small model of the target's family; a target that is already the smallest of its
family, or a user with one model at hand, has none. :func:`derive_model` builds one from the
target itself:

1. **Which layers to keep.** ``uniform``: evenly spaced, the first and last always kept.
   ``block-influence`` (ShortGPT, Men et al. 2024): ``BI_l = 1 - mean cos(x_l, y_l)``, the mean
   cosine similarity between layer ``l``'s input ``x_l`` and output ``y_l`` hidden states over the
   task's response tokens (``labels != -100``) under the target; the layers that change their
   input most (highest BI) are kept.
2. **Build.** A config of the target with ``num_hidden_layers`` and every per-layer list (Gemma
   3's ``layer_types``) cut to the kept layers; the kept blocks' weights, and the target's
   embeddings, final norm and LM head, copied over. Held in float32.
3. **Heal** (optional, ``heal_steps > 0``): distillation from the target on the task's own
   training text, ``KL(target || derived)`` per token over every real token (prompt and
   response: the attention mask), training the kept blocks (full parameters, or a LoRA adapter
   merged afterwards) with AdamW. See :func:`heal`.
4. **Publish.** A standard Hugging Face folder (``AutoModelForCausalLM.from_pretrained`` loads
   it) with the target's tokenizer and a ``derivation.json`` saying how it was made, cached under
   ``cache_root()/derived/<key>`` like a GGUF conversion: ``key`` (:func:`derivation_key`, built
   by :func:`speccore.utils.cache.cache_key`) holds the target's identity, the teacher's dtype and
   device type, every derivation setting and, when data is used, the data. A second call with
   the same inputs returns the cached folder without loading anything.

``select --small derive:0.5`` (and ``models.small: derive:0.5`` in a bench config) derives the
small model from ``--target`` on the run's own rows (:func:`resolve_derived`, the provider's
"small derive" stage); ``speccore derive`` builds one from the command line and ``speccore
agree`` checks any small model against its target (:mod:`speccore.proxies.agree`).

The defaults of :class:`DeriveSettings` come from the measurement in its docstring.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batches import IGNORE_INDEX, TokenizedData, collate, length_grouped_batches
from ..models.load import (
    LoadedModel,
    load_model,
    publish_folder,
    resolve_device,
    resolve_dtype,
    resolve_model,
)
from ..models.lora import seeded
from ..scoring.losses import eval_mode, forward, model_device
from ..train import lr_factor, warmup_steps
from ..train.loop import RunState, StepCheckpoint, checkpoint_key, save_for_stop
from ..utils import interrupt
from ..utils.cache import SCORER_VERSIONS, cache_key
from ..utils.errors import ConfigError, ModelError
from ..utils.io import cache_root, copy_tree, make_temp_dir, write_json
from ..utils.locks import file_lock
from ..utils.progress import progress
from ..utils.runfolder import check_out_folder, is_empty_dir, write_marker
from .agree import sample_rows

logger = logging.getLogger(__name__)

DERIVATION_FILE = "derivation.json"
SPEC_PREFIX = "derive:"

LayerSelection = Literal["uniform", "block-influence"]
HealMode = Literal["full", "lora"]
LAYER_SELECTIONS: tuple[str, ...] = ("uniform", "block-influence")
HEAL_MODES: tuple[str, ...] = ("full", "lora")
# Config attributes that may have the length of the layer count without being per-layer.
_NOT_PER_LAYER = frozenset({"architectures", "bad_words_ids", "suppress_tokens"})


@dataclass(frozen=True)
class DeriveSettings:
    """Every setting that decides what :func:`derive_model` builds (all in the cache key).

    ``layers``: a count ``N >= 1`` or a fraction ``0 < f < 1`` of the target's layers
    (``round(f * L)``, at least 2). ``bi_rows``: rows (a seeded sample) whose response tokens
    measure block influence. Healing: ``heal_steps`` AdamW steps of ``heal_batch_size`` rows at
    peak rate ``heal_lr`` (linear warm-up over the first 10 %, then cosine decay), gradients
    clipped to norm 1; ``heal_mode`` ``full`` trains every parameter of the kept blocks, ``lora``
    a rank-``heal_lora_r`` adapter on them (alpha ``2r``, no dropout) merged into the weights
    afterwards. ``seed`` seeds every random choice (row samples, batch order, LoRA init).

    **Defaults: a third of the layers, evenly spaced, healed 48 steps at 2e-4**, from the
    measurement of ``speed-bench/derive_agreement.py`` (``speed-bench/results/derive_agreement.md``:
    UI translation, 100 rows, both models untuned, K = 10, on the 2-core CPU; cost: seconds per
    row of STAFF's small-model work, a LoRA fine-tune epoch and a scoring pass, over the
    target's, timed side by side):

    ===================================  ========  ======  =========  ==========  ======
    small → target                       ρ effort  ρ loss  RI effort  cost ratio  heal s
    ===================================  ========  ======  =========  ==========  ======
    SmolLM2-135M → Gemma-3-270M (cross)  0.51      0.55    0.74       0.61        -
    Gemma 1/2 uniform → Gemma            0.43      0.15    0.76       0.81        -
    Gemma 1/2 block-influence → Gemma    0.11      0.34    0.75       0.81        -
    Gemma 1/2 uniform, healed 48 steps   0.62      0.44    0.77       0.81        629
    SmolLM2 1/2 uniform → SmolLM2        0.31      0.25    0.61       0.54        -
    SmolLM2 1/2 block-influence          0.50      0.43    0.66       0.54        -
    SmolLM2 1/2 uniform, healed 48       0.72      0.60    0.76       0.54        278
    Gemma 1/3 uniform, healed 48         0.67      0.58    0.76       0.72        607
    SmolLM2 1/3 uniform, healed 48       0.69      0.50    0.75       0.40        223
    Gemma 1/3 block-influence, healed 48 0.70      0.60    0.76       0.72        508
    SmolLM2 1/3 block-infl., healed 48   0.73      0.66    0.75       0.40        182
    ===================================  ========  ======  =========  ==========  ======

    On DialogSum (100 rows, prompts about three times as long): SmolLM2 → Gemma 0.44 / 0.82
    (ρ effort / ρ loss), cost 0.64; Gemma's third unhealed 0.25 / 0.28, healed 48 steps 0.57 /
    0.55 (cost 0.56, heal 1434 s); SmolLM2's third unhealed 0.12 / 0.32, healed 0.46 / 0.37
    (cost 0.45, heal 417 s). In the UI mini bench (p = 0.9, 3 seeds) STAFF with Gemma's healed
    third agreed with Gemma better than with SmolLM2 (ρ 0.75 vs 0.59 on the verified rows) but
    its coresets trained no better (staff-derived − staff: ROUGE-L -0.81 [-1.60, +0.00],
    reference NLL +0.034 [+0.028, +0.040]); see ``quality-bench/results/mini-uitrans``.

    Why these defaults:

    * **Healing on.** Without it a derived model is not worth its cost: its per-token KL to the
      target is 9.6 nats (SmolLM2's half) and 21.4 (Gemma's), and its effort ranks rows
      unlike the target's (Spearman 0.31 and 0.43), below the cross-family SmolLM2 (0.51).
      48 steps of 8 rows bring the KL to 2.1 and 1.4 and the Spearman of effort to 0.72 and
      0.62, above the cross-family pair. Four times as long (192 steps, 904 s) took
      SmolLM2's third further, to KL 0.61 and Spearman 0.79 (effort) and 0.86 (loss), from
      0.69 and 0.50: longer healing pays in agreement (not measured on Gemma, whose 192 steps
      would take ~40 min here, nor in the bench). Healing needs the task's rows (``select``
      and ``agree`` pass them; ``speccore derive`` takes ``--data``, or ``--heal-steps 0`` for
      an unhealed model).
    * **Its cost is fixed, not per row**, and large on a small task: 278 s (SmolLM2) and 629 s
      (Gemma, whose 262k-entry vocabulary the KL runs over) here, against 1.8 s and 2.9 s per
      row of the whole target's own fine-tune + scoring. Against the target doing that work
      itself, a derived third saves 1.08 s (SmolLM2) and 0.81 s (Gemma) per row (a half 0.82
      and 0.54), so its healing (223 s and 607 s) breaks even at about 210 and 750 rows (halves:
      340 and 1,160); the derived folder is cached, so another run or pruning rate does not pay
      it again.
    * **A third of the layers, uniform.** Healed, Gemma's third agrees with Gemma better than
      its half does (effort 0.67 vs 0.62, loss 0.58 vs 0.44) at 0.72 of its cost instead of
      0.81; SmolLM2's third agrees a little less than its half (0.69 vs 0.72, loss 0.50 vs
      0.60: within the noise of 100 rows on effort) at 0.40 instead of 0.54. A third is the
      better trade-off on both, and on a 7B target it costs 0.36 against 0.51.
    * **Uniform, for now.** Block influence was erratic unhealed (better for SmolLM2, far worse
      on effort for Gemma). Healed, it did a little better than uniform on UI for both targets
      (effort 0.73 vs 0.69 and 0.70 vs 0.67, loss 0.66 vs 0.50 and 0.60 vs 0.58, KL after
      healing 1.4 vs 2.2 and 0.9 vs 1.3), mostly within the noise of 100 rows (about 0.07), and
      it was not measured healed on DialogSum; it also costs a target pass over ``bi_rows``.
      One task is not enough to change the default (and the bench cells made with it).
    * **Cost scales with the target.** Gemma 3's lm_head is 63% of a response token's FLOPs, so
      its half costs 0.81 of it (on paper 0.81); SmolLM2's half 0.54 (on paper 0.50-0.61). A 7B
      target of 32 layers spends 2% of its FLOPs in the lm_head: its half costs about 0.51 per
      token, a third 0.36 (from FLOPs; ``derive_agreement.on_paper``).
    """

    layers: int | float = 1 / 3
    layer_selection: LayerSelection = "uniform"
    heal_steps: int = 48
    heal_lr: float = 2e-4
    heal_mode: HealMode = "full"
    heal_batch_size: int = 8
    heal_lora_r: int = 16
    bi_rows: int = 256
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first setting out of range."""
        _check_layers(self.layers)
        if self.layer_selection not in LAYER_SELECTIONS:
            raise ConfigError(
                f"--layer-selection must be one of {', '.join(LAYER_SELECTIONS)}, "
                f"got {self.layer_selection!r}"
            )
        if self.heal_mode not in HEAL_MODES:
            raise ConfigError(
                f"--heal-mode must be one of {', '.join(HEAL_MODES)}, got {self.heal_mode!r}"
            )
        if self.heal_steps < 0:
            raise ConfigError(f"--heal-steps must be >= 0, got {self.heal_steps}")
        if not (self.heal_lr > 0 and math.isfinite(self.heal_lr)):
            raise ConfigError(f"--heal-lr must be > 0, got {self.heal_lr}")
        if self.heal_batch_size < 1:
            raise ConfigError(f"heal batch size must be >= 1, got {self.heal_batch_size}")
        if self.heal_lora_r < 1:
            raise ConfigError(f"heal LoRA rank must be >= 1, got {self.heal_lora_r}")
        if self.bi_rows < 1:
            raise ConfigError(f"block-influence rows must be >= 1, got {self.bi_rows}")

    @property
    def needs_data(self) -> bool:
        return self.layer_selection == "block-influence" or self.heal_steps > 0


# --- public API ------------------------------------------------------------------------------


def derive_model(
    target: str | LoadedModel,
    *,
    layers: int | float = DeriveSettings.layers,
    layer_selection: LayerSelection = DeriveSettings.layer_selection,
    data: TokenizedData | None = None,
    heal_steps: int = DeriveSettings.heal_steps,
    heal_lr: float = DeriveSettings.heal_lr,
    heal_mode: HealMode = DeriveSettings.heal_mode,
    seed: int = DeriveSettings.seed,
    settings: DeriveSettings | None = None,
    out: str | os.PathLike[str] | None = None,
    dtype: str = "auto",
    device: str = "auto",
    max_batch_tokens: int = 4096,
) -> Path:
    """Derive a layer-dropped (and optionally healed) model from ``target``; its folder's path.

    ``target``: a model name (alias, folder, ``.gguf``, hub name) or a :class:`LoadedModel` (its
    plain model, without a LoRA adapter). ``data``: the task's training rows tokenised with the
    target's tokenizer; needed for ``block-influence`` and for healing. ``settings`` replaces
    the keyword settings (``layers`` … ``seed``) when given. ``dtype``/``device`` are those of
    the target while it measures and teaches (the derived model is trained and saved in
    float32); ``max_batch_tokens`` caps a forward pass's padded size (memory only, not results).

    The folder is ``cache_root()/derived/<key>`` (built on first use, atomically); with ``out``
    it is copied there too and ``out`` is returned. An ``out`` that exists must hold this very
    derivation.
    """
    if settings is None:
        settings = DeriveSettings(
            layers=layers,
            layer_selection=layer_selection,
            heal_steps=heal_steps,
            heal_lr=heal_lr,
            heal_mode=heal_mode,
            seed=seed,
        )
    settings.validate()
    if max_batch_tokens < 1:
        raise ConfigError(f"--max-batch-tokens must be >= 1, got {max_batch_tokens}")
    if settings.needs_data and data is None:
        raise ConfigError(
            f"--layer-selection {settings.layer_selection} with --heal-steps "
            f"{settings.heal_steps} needs the task's training data: pass --data, or use "
            "--layer-selection uniform --heal-steps 0"
        )
    if settings.needs_data and data is not None and len(data) == 0:
        raise ConfigError("the data for the derivation has no rows")
    source = target.source if isinstance(target, LoadedModel) else resolve_model(target)
    teacher_dtype, device_type = _teacher_placement(target, dtype, device)
    used = data if settings.needs_data else None
    key = derivation_key(source.identity, settings, teacher_dtype, device_type, used)
    folder = cache_root() / "derived" / key
    if out is not None:
        check_out_folder(out, "derive")  # a file, a parent that is a file, the user's files
    if out is not None and _other_derivation(Path(out), key):
        # Before any work: an hour of healing must not end in this error.
        raise ConfigError(
            f"--out {out} already holds another derived model; remove it or pass another folder"
        )
    if _is_derivation(folder, key):
        logger.info("derived model from cache: %s", folder)
        return folder if out is None else _copy_out(folder, Path(out), key)
    # One process derives; another one asking for the same model waits, then reuses it.
    with file_lock(cache_root() / "locks" / f"{key}.lock", "the derived model"):
        if _is_derivation(folder, key):
            logger.info("derived model from cache (made meanwhile): %s", folder)
        else:
            loaded = (
                target
                if isinstance(target, LoadedModel)
                else load_model(target, dtype=dtype, device=device)
            )
            _build_folder(loaded, settings, used, key, folder, max_batch_tokens)
    return folder if out is None else _copy_out(folder, Path(out), key)


def derivation_key(
    identity: str,
    settings: DeriveSettings,
    teacher_dtype: str,
    device_type: str,
    data: TokenizedData | None,
) -> str:
    """The cache key of a derivation (built by :func:`~speccore.utils.cache.cache_key`).

    It holds the target's source identity (the same whether the target is passed by name or
    loaded), the teacher's dtype (``"torch.float32"``) and device type (healing on a GPU and on
    the CPU give slightly different weights), the data's fingerprint (``"none"`` when no data is
    used), the code version ``SCORER_VERSIONS["derive"]``, every setting and the transformers
    version (the saved folder's layout).
    """
    import transformers

    return cache_key(
        "derived",
        model=identity,
        dtype=teacher_dtype,
        device=device_type,
        data="none" if data is None else data.fingerprint(),
        scorer="derive",
        extra=(asdict(settings), transformers.__version__),
    )


def read_derivation(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``derivation.json`` of a derived model folder, or None for any other folder."""
    path = Path(folder) / DERIVATION_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_derive_spec(name: str) -> bool:
    """Whether a model name is a ``derive:…`` spec (the small model derived from the target)."""
    return name.strip().lower().startswith(SPEC_PREFIX)


def parse_derive_spec(spec: str) -> DeriveSettings:
    """``derive:LAYERS[,key=value…]`` → :class:`DeriveSettings` (validated).

    ``LAYERS`` is a fraction (``derive:0.33``) or a count (``derive:10``); empty keeps the
    default. Keys: ``selection`` (uniform, block-influence), ``heal_steps``, ``heal_lr``,
    ``heal_mode`` (full, lora), ``heal_batch_size``, ``heal_lora_r``, ``bi_rows``, ``seed``,
    e.g. ``derive:0.5,selection=block-influence,heal_steps=300``.
    """
    if not is_derive_spec(spec):
        raise ConfigError(f"{spec!r} is not a derive spec; write e.g. derive:0.33")
    body = spec.strip()[len(SPEC_PREFIX) :]
    head, *pairs = [p.strip() for p in body.split(",")] if body else [""]
    values: dict[str, Any] = {}
    if head:
        values["layers"] = parse_layers(head, repr(spec))
    allowed = {f.name for f in fields(DeriveSettings)} - {"layers", "layer_selection"}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip().replace("-", "_")
        if name == "selection":
            name = "layer_selection"
        if not sep or (name not in allowed and name != "layer_selection"):
            raise ConfigError(
                f"{spec!r}: {pair!r} is not key=value with a key among selection, "
                f"{', '.join(sorted(allowed))}"
            )
        values[name] = _parse_value(name, value.strip(), spec)
    settings = replace(DeriveSettings(), **values)
    settings.validate()
    return settings


def resolve_derived(
    spec: str,
    target: str | LoadedModel,
    data: TokenizedData | None,
    *,
    dtype: str = "auto",
    device: str = "auto",
    max_batch_tokens: int = 4096,
) -> Path:
    """The folder of the small model a ``--small derive:…`` spec names, derived from ``target``.

    ``data``: the run's training rows tokenised with the target's tokenizer (the rows STAFF
    selects from). Cached: the second call with the same target, spec and data does no work.
    """
    return derive_model(
        target,
        settings=parse_derive_spec(spec),
        data=data,
        dtype=dtype,
        device=device,
        max_batch_tokens=max_batch_tokens,
    )


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


def distillation_kl(
    teacher: nn.Module,
    student: nn.Module,
    data: TokenizedData,
    *,
    indices: np.ndarray | None = None,
    max_batch_tokens: int = 4096,
) -> float:
    """Mean per-token ``KL(teacher || student)`` over every real token of the rows at
    ``indices`` (all when None): prompt and response alike, padding excluded."""
    idx = np.arange(len(data)) if indices is None else np.asarray(indices, dtype=np.int64)
    total, tokens = 0.0, 0
    device = model_device(student)
    with torch.inference_mode(), eval_mode(teacher), eval_mode(student):
        for piece in length_grouped_batches(data.lengths, max_batch_tokens, indices=idx):
            batch = {k: v.to(device) for k, v in collate(data, piece).items()}
            teacher_logp = _teacher_log_probs(teacher, batch)
            total += float(_kl_sum(teacher_logp, student, batch))
            tokens += teacher_logp.shape[0]
    return total / max(tokens, 1)


def heal(
    teacher: nn.Module,
    student: nn.Module,
    data: TokenizedData,
    settings: DeriveSettings,
    *,
    max_batch_tokens: int = 4096,
    checkpoint: Path | None = None,
) -> dict[str, Any]:
    """Distil ``teacher`` into ``student`` on ``data`` for ``settings.heal_steps`` steps.

    Loss of a step: ``KL(teacher || student)`` summed over every real token of its rows (prompt
    and response: the attention mask) divided by their count. The teacher's **full** next-token
    log-probabilities are computed per micro-batch under ``no_grad``, used, and freed
    before the next micro-batch: nothing is held for all rows, so memory is that of one
    micro-batch (``max_batch_tokens`` padded tokens × vocabulary, a few float32 copies). Rows
    come from a seeded permutation, repeated as needed.

    ``full`` trains every parameter of the blocks (embeddings, final norm and LM head stay the
    target's, frozen); ``lora`` trains an adapter on the blocks and merges it into them.

    With ``checkpoint`` (a file path), the state after a step (trained weights, optimizer,
    schedule, RNG states, the losses so far) is saved there atomically every
    ``HEAL_CHECKPOINT_SECONDS``, at the end, and when a stop signal arrives inside
    :func:`speccore.utils.interrupt.interruptible`; a later call with the same student, data and
    settings resumes from that step and heals to the same weights, bit for bit, as an
    uninterrupted run (a state of another healing is ignored).

    Returns ``{"model": the healed student (plain, frozen, eval mode), "losses": each step's KL,
    "resumed_at": the step a checkpoint resumed from (0: none)}``.
    """
    from ..models.lora import attach_lora

    model: Any = student
    for p in model.parameters():
        p.requires_grad_(False)
    if settings.heal_mode == "lora":
        from ..config import LoraSettings

        lora = LoraSettings(r=settings.heal_lora_r, alpha=2 * settings.heal_lora_r, dropout=0.0)
        model = attach_lora(student, lora, seed=settings.seed)
    else:
        for p in decoder_layers(model).parameters():
            p.requires_grad_(True)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    run = _distil(teacher, model, named, data, settings, max_batch_tokens, checkpoint)
    if settings.heal_mode == "lora":
        model = model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return {"model": model, "losses": run.losses, "resumed_at": run.resumed_at}


# --- building the folder -------------------------------------------------------------------


def _build_folder(
    loaded: LoadedModel,
    settings: DeriveSettings,
    data: TokenizedData | None,
    key: str,
    folder: Path,
    max_batch_tokens: int,
) -> None:
    """Select, build, heal and publish one derivation into ``folder`` (atomically)."""
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    teacher = loaded.model
    _refuse_adapter(teacher)
    t = time.perf_counter()
    kept, bi = select_layers(teacher, settings, data, max_batch_tokens)
    seconds["layer_selection"] = time.perf_counter() - t
    total = len(decoder_layers(teacher))
    logger.info("deriving %s: keeping layers %s of %d", loaded.source.name, kept, total)
    t = time.perf_counter()
    student = build_derived(teacher, kept)
    _, trimmed = derived_config(teacher.config, kept)
    seconds["build"] = time.perf_counter() - t
    # A long healing checkpoints beside the folder it will publish; removed once published.
    state = folder.parent / f".{folder.name}.heal" / "heal_state.pt"
    heal_record, student, seconds["heal"] = _heal_stage(
        teacher, student, data, settings, max_batch_tokens, state
    )
    record = {
        "format": SCORER_VERSIONS["derive"],
        "key": key,
        "target": {
            "name": loaded.source.name,
            "identity": loaded.source.identity,
            "architecture": type(teacher).__name__,
            "num_hidden_layers": total,
            "dtype": str(next(teacher.parameters()).dtype).removeprefix("torch."),
            "parameters": _param_count(teacher),
        },
        "kept_layers": kept,
        "num_hidden_layers": len(kept),
        "parameters": _param_count(student),
        "trimmed_config_lists": trimmed,
        "settings": asdict(settings),
        "block_influence": None if bi is None else [float(v) for v in bi],
        "data": None if data is None else {"rows": len(data), "fingerprint": data.fingerprint()},
        "heal": heal_record,
        "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    t = time.perf_counter()
    _save(student, loaded.tokenizer, record, folder, seconds, start, t)
    shutil.rmtree(state.parent, ignore_errors=True)


def _heal_stage(
    teacher: nn.Module,
    student: Any,
    data: TokenizedData | None,
    settings: DeriveSettings,
    max_batch_tokens: int,
    checkpoint: Path | None = None,
) -> tuple[dict[str, Any], Any, float]:
    """Heal (if asked; resumable from ``checkpoint``) and measure the KL before and after on
    a seeded sample of the rows."""
    record: dict[str, Any] = {
        "steps": settings.heal_steps,
        "lr": settings.heal_lr,
        "mode": settings.heal_mode,
        "batch_size": settings.heal_batch_size,
        "teacher_log_probs": "full vocabulary, per micro-batch",
    }
    if data is None:
        return record, student, 0.0
    # Measured on a sample of the healing rows themselves (not held out): it says how far the
    # derived model is from the target on the task's text, before and after.
    rows = sample_rows(len(data), 32, settings.seed + 1)
    record["kl_rows"] = len(rows)
    record["kl_before"] = distillation_kl(
        teacher, student, data, indices=rows, max_batch_tokens=max_batch_tokens
    )
    start = time.perf_counter()
    if settings.heal_steps > 0:
        result = heal(
            teacher,
            student,
            data,
            settings,
            max_batch_tokens=max_batch_tokens,
            checkpoint=checkpoint,
        )
        student = result["model"]
        record["resumed_at_step"] = result["resumed_at"]  # seconds count this run's steps only
        record["first_step_loss"] = result["losses"][0]
        record["last_step_loss"] = result["losses"][-1]
    seconds = time.perf_counter() - start
    record["seconds"] = seconds
    record["kl_after"] = distillation_kl(
        teacher, student, data, indices=rows, max_batch_tokens=max_batch_tokens
    )
    logger.info(
        "derived model KL to the target: %.3f before healing, %.3f after (%d steps, %.1f s)",
        record["kl_before"],
        record["kl_after"],
        settings.heal_steps,
        seconds,
    )
    return record, student, seconds


def _save(
    model: Any,
    tokenizer: Any,
    record: dict[str, Any],
    folder: Path,
    seconds: dict[str, float],
    start: float,
    save_start: float,
) -> None:
    tmp = make_temp_dir(folder.parent, f".{folder.name}.")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        seconds["save"] = time.perf_counter() - save_start
        seconds["total"] = time.perf_counter() - start
        record["seconds"] = seconds
        # Written last: a folder with derivation.json is complete.
        write_json(tmp / DERIVATION_FILE, record)
        publish_folder(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("derived model saved to %s (%.1f s)", folder, seconds["total"])


def _copy_out(folder: Path, out: Path, key: str) -> Path:
    """Copy the cached folder to ``out`` (atomically) unless ``out`` holds it already."""
    if _is_derivation(out, key):
        return out
    # Copied into a private folder first, then renamed: a reader never sees half a model.
    tmp = make_temp_dir(out.parent, f".{out.name}.")
    try:
        copy = copy_tree(folder, tmp / "model")
        write_marker(copy, "derive")
        os.rename(copy, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _other_derivation(folder: Path, key: str) -> bool:
    """Whether ``folder`` exists, is not empty and holds another derivation than ``key``."""
    return folder.is_dir() and not is_empty_dir(folder) and not _is_derivation(folder, key)


def _is_derivation(folder: Path, key: str) -> bool:
    record = read_derivation(folder) if folder.is_dir() else None
    return record is not None and record.get("key") == key and (folder / "config.json").is_file()


# --- distillation ----------------------------------------------------------------------------


#: How often a healing saves its state (seconds): a full-parameter state is the kept blocks'
#: weights and two AdamW moments (about 0.4 GB for Gemma-3-270M's third), so not every step;
#: a hard kill (SIGKILL, power loss) loses at most this much.
HEAL_CHECKPOINT_SECONDS = 120.0


@dataclass
class _HealRun(RunState):
    resumed_at: int = 0  # the step a checkpoint resumed from


def _distil(
    teacher: nn.Module,
    student: nn.Module,
    named: list[tuple[str, nn.Parameter]],
    data: TokenizedData,
    settings: DeriveSettings,
    max_batch_tokens: int,
    checkpoint: Path | None,
) -> _HealRun:
    """The heal loop (resumable from ``checkpoint``); the run with each step's mean KL."""
    steps = settings.heal_steps
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=settings.heal_lr, weight_decay=0.0)
    scheduler = _warmup_cosine(optimizer, steps)
    run = _HealRun(steps)
    saver = None
    if checkpoint is not None:
        key = checkpoint_key(named, data, settings, max_batch_tokens)
        saver = StepCheckpoint(checkpoint, key, None, HEAL_CHECKPOINT_SECONDS, label="heal")
    student.train()
    try:
        with seeded(settings.seed, student), eval_mode(teacher):
            if saver is not None:
                saver.load(student, named, optimizer, scheduler, run)
                run.resumed_at = run.step
            plan = _heal_rows(len(data), settings)[run.step :]
            bar = progress(plan, desc="heal", unit="step", initial=run.step, total=steps)
            for rows in bar:
                loss = _heal_step(teacher, student, data, rows, max_batch_tokens)
                if not math.isfinite(loss):
                    raise ModelError(
                        f"healing loss became {loss} at step {run.step}: lower --heal-lr"
                    )
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                run.step += 1
                run.losses.append(loss)
                bar.set_postfix(kl=f"{loss:.3f}", refresh=False)
                logger.debug("heal step %d: KL %.4f", run.step, loss)
                if saver is not None:
                    saver.maybe_save(named, optimizer, scheduler, run)
                interrupt.stop_point(
                    lambda: save_for_stop(saver, named, optimizer, scheduler, run), steps, "steps"
                )
            if saver is not None:  # a crash before the folder is published keeps the healing
                saver.save(named, optimizer, scheduler, run)
    except interrupt.Interrupted as e:
        e.update(0 if saver is None else saver.saved_step, steps, "steps")
        raise
    finally:
        student.eval()
    return run


def _heal_step(
    teacher: nn.Module,
    student: nn.Module,
    data: TokenizedData,
    rows: np.ndarray,
    max_batch_tokens: int,
) -> float:
    """Accumulate the gradient of one step's mean per-token KL over ``rows``; that KL."""
    device = model_device(student)
    pieces = length_grouped_batches(data.lengths, max_batch_tokens, indices=rows)
    batches = [collate(data, piece) for piece in pieces]
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    total = 0.0
    for cpu_batch in batches:
        batch = {k: v.to(device) for k, v in cpu_batch.items()}
        # no_grad, not inference_mode: the KL's backward reads the teacher's log-probs.
        with torch.no_grad():
            teacher_logp = _teacher_log_probs(teacher, batch)
        kl = _kl_sum(teacher_logp, student, batch)
        del teacher_logp
        (kl / n_tokens).backward()
        total += float(kl.detach())
    return total / n_tokens


def _warmup_cosine(optimizer: torch.optim.Optimizer, steps: int) -> Any:
    """The fine-tune's schedule (:func:`~speccore.train.lr_factor`): linear warm-up over the
    first 10 % of the steps (at least one), then cosine decay towards 0."""
    warmup = max(1, warmup_steps(steps, 0.1))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps, warmup))


def _heal_rows(n: int, settings: DeriveSettings) -> list[np.ndarray]:
    """Rows of every heal step: seeded permutations of all rows, one after another."""
    rng = np.random.default_rng(settings.seed)
    size = min(settings.heal_batch_size, n)
    order = np.zeros(0, dtype=np.int64)
    batches = []
    for _ in range(settings.heal_steps):
        if len(order) < size:
            order = np.concatenate([order, rng.permutation(n)])
        batches.append(order[:size])
        order = order[size:]
    return batches


def _teacher_log_probs(teacher: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Float32 log-probabilities ``[N, V]`` of the teacher at the batch's real tokens."""
    logits = forward(teacher, batch).logits
    mask = batch["attention_mask"].bool()
    return F.log_softmax(logits[mask].float(), dim=-1)


def _kl_sum(teacher_logp: Tensor, student: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """``sum_t KL(p_teacher,t || p_student,t)`` over the batch's real tokens (differentiable)."""
    logits = forward(student, batch).logits
    mask = batch["attention_mask"].bool()
    student_logp = F.log_softmax(logits[mask].float(), dim=-1)
    del logits
    return F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum")


# --- small helpers -------------------------------------------------------------------------


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


def _refuse_adapter(model: nn.Module) -> None:
    if hasattr(model, "peft_config") or any("lora_" in n for n, _ in model.named_parameters()):
        raise ModelError(
            "the target carries a LoRA adapter; derive from the plain model (before attach_lora), "
            "or pass the target's name"
        )


def _teacher_placement(target: str | LoadedModel, dtype: str, device: str) -> tuple[str, str]:
    """The teacher's torch dtype (``"torch.float32"``) and device type (``"cpu"``), known
    before a named target is loaded (a cache hit loads nothing)."""
    if isinstance(target, LoadedModel):
        torch_dtype = next(target.model.parameters()).dtype
        device_type = model_device(target.model).type
    else:
        resolved = resolve_device(device)
        torch_dtype, device_type = resolve_dtype(dtype, resolved), resolved.type
    return str(torch_dtype), device_type


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _versions() -> dict[str, str]:
    import transformers

    try:
        speccore = importlib.metadata.version("speccore")
    except importlib.metadata.PackageNotFoundError:
        speccore = "unknown"
    return {
        "speccore": speccore,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }


def _check_layers(layers: int | float) -> None:
    if isinstance(layers, bool) or not isinstance(layers, int | float):
        raise ConfigError(f"--layers must be a count >= 1 or a fraction in (0, 1), got {layers!r}")
    if isinstance(layers, float) and not layers.is_integer():
        if not 0 < layers < 1:
            raise ConfigError(
                f"--layers {layers}: a fraction must lie in (0, 1); a count must be a whole number"
            )
    elif layers < 1:
        raise ConfigError(f"--layers must be a count >= 1 or a fraction in (0, 1), got {layers}")


def parse_layers(text: str, where: str = "--layers") -> int | float:
    """``"10"`` → 10 (a count), ``"0.33"`` → 0.33 (a fraction); range checks are
    :func:`layer_count`'s. ``where`` names the flag or spec in the error."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(
            f"{where}: layers {text!r} is not a number; write a fraction such as 0.33 or a "
            "count such as 10"
        ) from None
    if value.is_integer() and not text.strip().lstrip("+-").isdigit():
        # "1.0" reads as a fraction (all layers) to some and as one layer to others.
        raise ConfigError(
            f"{where}: layers {text!r} is ambiguous; write {int(value)} for {int(value)} "
            f"layer{'s' if int(value) != 1 else ''} (a count), or a fraction below 1 such as 0.5"
        )
    return int(value) if value.is_integer() else value


def _parse_value(name: str, text: str, spec: str) -> Any:
    kind = {f.name: f.type for f in fields(DeriveSettings)}[name]
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise ConfigError(f"{spec!r}: {name}={text!r} is not a number") from None
    return text
