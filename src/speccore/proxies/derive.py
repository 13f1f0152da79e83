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

import importlib.metadata
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.batches import TokenizedData
from ..models.load import (
    LoadedModel,
    load_model,
    publish_folder,
    resolve_device,
    resolve_dtype,
    resolve_model,
)
from ..scoring.losses import model_device
from ..utils.cache import SCORER_VERSIONS, cache_key
from ..utils.errors import ConfigError
from ..utils.io import cache_root, copy_tree, make_temp_dir, write_json
from ..utils.locks import file_lock
from ..utils.runfolder import check_out_folder, is_empty_dir, write_marker
from .agree import sample_rows
from .derive_settings import DeriveSettings, HealMode, LayerSelection, parse_layers
from .heal import distillation_kl, heal
from .layers import (
    _param_count,
    _refuse_adapter,
    build_derived,
    decoder_layers,
    derived_config,
    select_layers,
)

logger = logging.getLogger(__name__)

DERIVATION_FILE = "derivation.json"
SPEC_PREFIX = "derive:"


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


# --- small helpers -------------------------------------------------------------------------


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
