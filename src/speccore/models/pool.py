"""Model lifecycle: each model loaded once per pool, however many selections use it.

A :class:`ModelPool` hands out the same :class:`~speccore.models.LoadedModel` for the same
(model, dtype, device, loading options). A bench keeps one pool for all its cells, so the small
model and the target load once per bench instead of once per cell. Whoever attaches a LoRA to a
pooled model detaches it when done (:meth:`speccore.run.provider.ModelProvider.close`), so the next
user finds the pretrained weights untouched.
"""

from __future__ import annotations

import logging
from typing import Any

from .load import LoadedModel, load_model, resolve_model

logger = logging.getLogger(__name__)


class ModelPool:
    """Loaded models by (identity, dtype, device, options)."""

    def __init__(self) -> None:
        self._models: dict[tuple[Any, ...], LoadedModel] = {}

    def get(
        self,
        name: str,
        *,
        role: str = "target",
        dtype: str = "auto",
        device: str = "auto",
        **options: Any,
    ) -> Any:
        """The model ``name`` loaded with these settings for ``role``, from the pool when it is
        there. Roles get their own copies (a small model that is also the target carries its own
        adapter). ``options`` go to :func:`~speccore.models.load_model` (only those set)."""
        options = {k: v for k, v in options.items() if v not in (None, False)}
        identity = resolve_model(name).identity
        key = (role, identity, dtype, device, tuple(sorted(options.items())))
        loaded = self._models.get(key)
        if loaded is None:
            loaded = load_model(name, dtype=dtype, device=device, **options)
            self._models[key] = loaded
        else:
            logger.info("%s already loaded", name)
        return loaded

    def __len__(self) -> int:
        return len(self._models)

    def clear(self) -> None:
        self._models.clear()
