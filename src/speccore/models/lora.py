"""LoRA adapters (peft): attach, save, load, fingerprint and remove.

A fresh adapter on a model that already has one: ``base = detach_lora(peft_model)`` (removes the
LoRA layers without merging them, so ``base`` is the untouched pretrained model again), then
``attach_lora(base, settings, seed)``. That is how the target model gets a fresh adapter for
verification and, later, a separately tuned one.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import LoraSettings
from ..utils.errors import ConfigError, ModelError
from ..utils.io import fingerprint

logger = logging.getLogger(__name__)

# The architectures speccore ships aliases for (Llama for SmolLM2, Gemma3) use these names;
# default_target_modules() finds the right ones for any other architecture.
DEFAULT_TARGET_MODULES = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]

_SKIPPED = ("lm_head", "embed", "wte", "wpe")


def default_target_modules(model: nn.Module) -> list[str]:
    """Names of every linear projection inside the transformer blocks (attention and MLP).

    A block is a module inside an ``nn.ModuleList`` (its path has a numeric part such as
    ``layers.3``); ``lm_head`` and embeddings are never targets. Returns leaf names in order of
    first appearance, e.g. ``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj``.
    """
    from transformers.pytorch_utils import Conv1D

    names: list[str] = []
    for full_name, module in model.named_modules():
        if not isinstance(module, nn.Linear | Conv1D):
            continue
        parts = full_name.split(".")
        if not any(p.isdigit() for p in parts[:-1]) or any(s in full_name for s in _SKIPPED):
            continue
        if parts[-1] not in names:
            names.append(parts[-1])
    if not names:
        raise ModelError(
            f"found no linear layers inside the blocks of {type(model).__name__}; "
            "pass the LoRA targets with --lora-target-modules"
        )
    return names


def attach_lora(model: nn.Module, settings: LoraSettings, seed: int = 0) -> Any:
    """Wrap ``model`` in a fresh, seeded LoRA adapter (``peft.PeftModel``), in eval mode.

    peft injects the LoRA layers into ``model`` in place and freezes its weights. The random init
    of the LoRA ``A`` matrices runs under a forked RNG seeded with ``seed``: the same seed gives
    the same adapter, and the caller's global RNG state is left as it was.
    """
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model

    if isinstance(model, PeftModel) or hasattr(model, "peft_config"):
        raise ModelError("model already has a LoRA adapter; call detach_lora() on it first")
    _check_settings(settings)
    targets = settings.target_modules or default_target_modules(model)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(targets),
        task_type=TaskType.CAUSAL_LM,
    )
    with seeded(seed, model), _quiet_peft():
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as e:
            raise ModelError(f"cannot attach LoRA to {targets}: {e}") from e
    # peft leaves the new LoRA layers in training mode (dropout on): scoring needs eval mode.
    peft_model.eval()
    return peft_model


def detach_lora(peft_model: Any) -> nn.Module:
    """Remove the LoRA layers (without merging) and return the untouched base model.

    Its weights stay frozen (``requires_grad`` False), ready for :func:`attach_lora` again.
    """
    return peft_model.unload()


def save_adapter(peft_model: Any, path: str | os.PathLike[str]) -> Path:
    """Save the adapter to folder ``path`` atomically (temp folder beside it, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    old = path.parent / f".{path.name}.old"
    try:
        peft_model.save_pretrained(str(tmp))
        open_folder_mode(tmp)
        if path.exists():
            # A folder cannot be renamed over a non-empty one: move the old one aside first.
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path


def check_adapter_folder(path: str | os.PathLike[str], flag: str = "adapter") -> Path:
    """``path`` if it is a folder holding a saved adapter; else a :class:`ModelError` saying
    what is wrong (it does not exist, is not a folder, or has no adapter_config.json)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelError(f"{flag} {str(path)!r} does not exist; check the path")
    if not (path / "adapter_config.json").is_file():
        raise ModelError(
            f"{flag} {str(path)!r} has no adapter_config.json: pass a folder written by "
            "speccore (or peft's save_pretrained)"
        )
    return path


def load_adapter(model: nn.Module, path: str | os.PathLike[str]) -> Any:
    """Load a saved LoRA adapter onto ``model`` (trainable, so it can be scored or tuned on).

    Returned in eval mode (LoRA dropout off), like :func:`attach_lora`.
    """
    from peft import PeftModel

    path = check_adapter_folder(path)
    with seeded(0, model), _quiet_peft():
        try:
            peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=True)
        except (ValueError, KeyError, RuntimeError) as e:
            raise ModelError(f"adapter {str(path)!r} does not fit this model: {e}") from e
    peft_model.eval()
    return peft_model


def enable_gradient_checkpointing(peft_model: Any) -> Any:
    """Recompute each transformer block's activations in the backward instead of keeping them.

    For fine-tunes and effort scoring of models whose activations do not fit: memory per block
    drops to its input, for about one more forward per backward. Uses the non-reentrant variant
    (``use_reentrant=False``): it needs no input that requires a gradient (so no
    ``enable_input_require_grads`` hook on the embeddings, which only the reentrant variant needs),
    restores the RNG state for the recompute (dropout draws the same masks) and keeps the original
    forward's autograd graph, which the effort hooks rely on. Returns ``peft_model``.
    """
    base = _hf_model(peft_model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ModelError(
            f"{type(base).__name__} does not support gradient checkpointing; "
            "run without --gradient-checkpointing"
        )
    kwargs = {"use_reentrant": False}
    with warnings.catch_warnings():
        # transformers 5 renamed the method and deprecated the old name.
        warnings.filterwarnings("ignore", "`gradient_checkpointing_enable`", FutureWarning)
        enable = getattr(base, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    logger.debug("gradient checkpointing on for %s", type(base).__name__)
    return peft_model


def disable_gradient_checkpointing(peft_model: Any) -> Any:
    """Undo :func:`enable_gradient_checkpointing`; returns ``peft_model``."""
    base = _hf_model(peft_model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`gradient_checkpointing_disable`", FutureWarning)
        disable = getattr(base, "activation_checkpointing_disable", None)
        if disable is not None:
            disable()
        else:
            base.gradient_checkpointing_disable()
    return peft_model


def gradient_checkpointing_on(model: Any) -> bool:
    """Whether any block of ``model`` is set to checkpoint its activations."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _hf_model(model: Any) -> Any:
    """The Hugging Face model inside a peft wrapper (or ``model`` itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def adapter_fingerprint(peft_model: Any) -> str:
    """A digest of the adapter's weights (names sorted): equal adapters, equal fingerprints."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    parts: list[Any] = []
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        parts += [name, str(tensor.dtype), list(tensor.shape)]
        # Raw bytes, so bfloat16 (which numpy lacks) hashes too.
        parts.append(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return fingerprint(*parts)


def open_folder_mode(folder: Path) -> None:
    """Give a ``mkdtemp`` folder (always 0700) the permissions of the folder it sits in."""
    folder.chmod(folder.parent.stat().st_mode & 0o777)


@contextmanager
def seeded(
    seed: int, model: nn.Module | None = None, device: str | torch.device | None = None
) -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` without touching the global RNG state.

    Forks the CPU RNG and that of every CUDA device ``model`` lives on (or ``device`` names).
    """
    devices = {p.device for p in model.parameters()} if model is not None else set()
    if device is not None:
        devices.add(torch.device(device))
    cuda = sorted(
        {
            d.index if d.index is not None else torch.cuda.current_device()
            for d in devices
            if d.type == "cuda"
        }
    )
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft calls a transformers method deprecated in v5; the notice means nothing to users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        yield


def _check_settings(settings: LoraSettings) -> None:
    if settings.r < 1:
        raise ConfigError(f"--lora-r must be >= 1, got {settings.r}")
    if settings.alpha <= 0:
        raise ConfigError(f"--lora-alpha must be > 0, got {settings.alpha}")
    if not 0 <= settings.dropout < 1:
        raise ConfigError(f"--lora-dropout must be in [0, 1), got {settings.dropout}")
