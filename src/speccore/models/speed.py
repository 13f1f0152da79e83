"""What makes the training and scoring loops run at the device's speed, and is harmless elsewhere
(batches reach the device through :func:`speccore.data.batches.to_device`).

* :func:`adamw`: the fused AdamW on CUDA (one kernel for all parameters), torch's default
  elsewhere (the CPU result stays what it was).
* :func:`adapter_autocast`: a half-precision base with float32 LoRA weights (what peft makes)
  runs its adapter math in the base's dtype under autocast, the float32 weights staying the
  optimizer's master copy; losses and effort's per-sample pieces are still float32.
* :func:`compile_forward`: ``torch.compile`` on the base model's forward (``--compile``);
  :func:`eager_forward` runs a block without it (effort's taps are Python objects that a graph
  cannot hold).

Each choice is a plain function of its inputs, unit-tested on the CPU.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)


# --- optimizer ---------------------------------------------------------------------------------


def adamw_kind(params: Iterable[Tensor]) -> str:
    """``"fused"`` when every parameter is a floating-point CUDA tensor, else ``"default"``
    (torch picks foreach or the per-parameter loop)."""
    params = list(params)
    fused = bool(params) and all(p.device.type == "cuda" and p.is_floating_point() for p in params)
    return "fused" if fused else "default"


def adamw(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``params``, fused where :func:`adamw_kind` says so."""
    if adamw_kind(params) == "fused":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


# --- adapter precision -------------------------------------------------------------------------

_HALF = (torch.bfloat16, torch.float16)


def autocast_dtype(model: nn.Module) -> torch.dtype | None:
    """The half dtype the adapter math should run in, or None (leave the model as it is).

    A model whose frozen (base) weights are bf16/fp16 and whose trainable or LoRA weights are
    float32 gets its base dtype: the LoRA matmuls then run at the speed of the base ones instead
    of casting every activation to float32 and back. All-float32 and all-half models: None.
    """
    base: set[torch.dtype] = set()
    adapter: set[torch.dtype] = set()
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        (adapter if "lora_" in name else base).add(p.dtype)
    if len(base) == 1 and adapter == {torch.float32}:
        (dtype,) = base
        return dtype if dtype in _HALF else None
    return None


@contextlib.contextmanager
def adapter_autocast(model: nn.Module) -> Iterator[None]:
    """Run the block under ``torch.autocast`` in :func:`autocast_dtype` (nothing when None)."""
    dtype = autocast_dtype(model)
    if dtype is None:
        yield
        return
    device = next(model.parameters()).device.type
    with torch.autocast(device_type=device, dtype=dtype):
        yield


# --- torch.compile -----------------------------------------------------------------------------

_EAGER = "_speccore_eager_forward"

#: torch.compile's backend for ``--compile`` ("eager" or "aot_eager" trace without generating
#: code: tests use them, inductor takes minutes to compile on a small CPU).
COMPILE_BACKEND = "inductor"


def _hf_model(model: Any) -> Any:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def compile_forward(model: Any, backend: str | None = None) -> Any:
    """Compile the forward of ``model``'s Hugging Face model (inside a peft wrapper) with
    ``torch.compile`` (``backend`` default :data:`COMPILE_BACKEND`; shapes dynamic: token
    batches vary in both dimensions); idempotent. Returns ``model``.

    Results equal the eager ones up to float rounding (kernel fusion may reorder sums), so
    adapter and score cache keys do not include it."""
    backend = backend or COMPILE_BACKEND
    base = _hf_model(model)
    if _EAGER in vars(base):
        return model
    eager = base.forward
    setattr(base, _EAGER, eager)
    base.forward = torch.compile(eager, backend=backend, dynamic=True)
    logger.debug("compiled the forward of %s (%s)", type(base).__name__, backend)
    return model


def uncompile_forward(model: Any) -> Any:
    """Undo :func:`compile_forward`; returns ``model``."""
    base = _hf_model(model)
    if _EAGER in vars(base):
        del base.forward
        delattr(base, _EAGER)
    return model


def is_compiled(model: Any) -> bool:
    return _EAGER in vars(_hf_model(model))


@contextlib.contextmanager
def eager_forward(model: Any) -> Iterator[None]:
    """Run the block with the uncompiled forward (effort: its taps hold Python objects)."""
    base = _hf_model(model)
    compiled = vars(base).get("forward") if _EAGER in vars(base) else None
    if compiled is None:
        yield
        return
    base.forward = vars(base)[_EAGER]
    try:
        yield
    finally:
        base.forward = compiled
