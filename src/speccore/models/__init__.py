"""Model loading (aliases, GGUF conversion cache), LoRA adapters and tiny test models."""

from __future__ import annotations

from .load import (
    ALIASES,
    LoadedModel,
    ModelSource,
    check_family,
    converted_folder,
    ensure_gguf,
    load_model,
    resolve_device,
    resolve_dtype,
    resolve_model,
)
from .lora import (
    DEFAULT_TARGET_MODULES,
    adapter_fingerprint,
    attach_lora,
    default_target_modules,
    detach_lora,
    load_adapter,
    save_adapter,
    seeded,
)
from .tiny import (
    llama_config_for,
    llama_param_count,
    random_llama,
    tiny_causal_lm,
    tiny_model_folder,
    tiny_tokenizer,
)

__all__ = [
    "ALIASES",
    "DEFAULT_TARGET_MODULES",
    "LoadedModel",
    "ModelSource",
    "adapter_fingerprint",
    "attach_lora",
    "check_family",
    "converted_folder",
    "default_target_modules",
    "detach_lora",
    "ensure_gguf",
    "llama_config_for",
    "llama_param_count",
    "load_adapter",
    "load_model",
    "random_llama",
    "resolve_device",
    "resolve_dtype",
    "resolve_model",
    "save_adapter",
    "seeded",
    "tiny_causal_lm",
    "tiny_model_folder",
    "tiny_tokenizer",
]
