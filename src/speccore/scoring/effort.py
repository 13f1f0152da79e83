"""STAFF's effort score: the L2 norm of each sample's loss gradient w.r.t. the LoRA parameters.

:func:`effort_batch` gets every sample's gradient norm from one forward and one backward pass of
the whole batch. A LoRA layer computes ``y = W x + s * B (A x)`` (``s = lora_alpha / r``, the
``scaling``). With ``h = A x`` and ``u = B h`` (the output of ``lora_B``, before ``s``), and
``g_t = dL/du_t``, the per-sample gradients are sums over that sample's positions::

    dL_d/dB = sum_t g_t h_t^T              # [d_out, r]
    dL_d/dA = sum_t (B^T g_t) x_t^T        # [r, d_in];  B^T g_t = dL/dh_t

The scaling needs no special care: ``g`` is taken at ``u``, i.e. *before* the multiplication by
``s``, so it already carries the factor ``s`` once, exactly as the parameter gradient does. The
loss of the backward is the *sum* of the per-sample mean losses, so each sample's rows of ``g``
belong to that sample's loss alone (samples do not interact in a forward pass).

Tensor hooks compute the per-sample gradients layer by layer while the backward runs, so no
``[B, T, d_out]`` gradient outlives its layer and no ``.grad`` is written: the backward is asked
only for the (small) gradients at ``h``, which it must pass ``u`` to reach.
:func:`effort_reference` is the slow, obviously correct per-sample loop the batched version is
tested against.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..data.tokenized import IGNORE_INDEX
from ..errors import ModelError
from .losses import eval_mode, forward, kept_positions, response_logits, token_losses

_NO_LORA = (
    "effort needs a model with active LoRA adapters: wrap it with peft.get_peft_model "
    "(and do not disable the adapters while scoring)"
)


def effort_batch(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Per-sample effort ``||grad_phi L_d||_2`` (phi = the active LoRA A and B weights), ``[B]``.

    One forward and one backward for the whole batch; the model runs in eval mode (its modes are
    restored afterwards) and no ``.grad`` is left on any parameter. A sample with no response
    token gets ``nan``. Float64 on the CPU.
    """
    pairs = _lora_pairs(model)
    if not pairs:
        raise ModelError(_NO_LORA)
    labels = batch["labels"]
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    keep = kept_positions(labels)  # logits only over the response window
    tracker = _Tracker(valid=batch["attention_mask"].bool(), shape=tuple(labels.shape), keep=keep)
    handles: list[RemovableHandle] = []
    try:
        with torch.inference_mode(False), torch.enable_grad(), eval_mode(model):
            for pair in pairs:
                handles += tracker.attach(pair)
            logits, window_labels = response_logits(model, batch, keep)
            loss = _summed_mean_loss(logits, window_labels, counts)
            del logits
            hs = tracker.grad_inputs()
            if hs and loss.requires_grad:
                # Asking for dL/dh drives the backward through every lora_B output u, whose
                # hooks do the work; the returned [B, T, r] tensors are small and dropped.
                torch.autograd.grad(loss, hs, allow_unused=True)
        sq = tracker.finish()
    finally:
        for handle in handles:
            handle.remove()
        tracker.clear()
    effort = sq.sqrt().cpu()
    return torch.where(counts.cpu() > 0, effort, torch.full_like(effort, float("nan")))


def effort_reference(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The same score as :func:`effort_batch`, one sample at a time, by plain autograd.

    Each sample is stripped of its padding, run alone, and its mean response loss differentiated
    w.r.t. every active LoRA parameter. Logits are computed at every position (no response
    window), so the batched path is checked against the plain computation. Slow; meant for tests
    and benchmarks. Float64 on the CPU.
    """
    params = [p for pair in _lora_pairs(model) for p in pair.params()]
    if not params:
        raise ModelError(_NO_LORA)
    flags = [p.requires_grad for p in params]
    out = torch.empty(batch["input_ids"].shape[0], dtype=torch.float64)
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.inference_mode(False), torch.enable_grad(), eval_mode(model):
            for d in range(len(out)):
                out[d] = _one_sample_effort(model, batch, d, params)
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    return out


def _one_sample_effort(
    model: nn.Module, batch: dict[str, Tensor], d: int, params: list[nn.Parameter]
) -> float:
    keep = batch["attention_mask"][d].bool()
    row = {
        "input_ids": batch["input_ids"][d][keep][None],
        "attention_mask": batch["attention_mask"][d][keep][None],
        "labels": batch["labels"][d][keep][None],
    }
    # Full logits on purpose (not response_logits): the reference stays the obvious computation.
    ce, mask = token_losses(forward(model, row).logits, row["labels"])
    if not mask.any():
        return float("nan")
    loss = ce[mask].mean()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    total = sum(float(g.double().pow(2).sum()) for g in grads if g is not None)
    return total**0.5


def _summed_mean_loss(logits: Tensor, labels: Tensor, counts: Tensor) -> Tensor:
    """``sum_d L_d`` with ``L_d`` the mean over sample d's tokens (0 for a sample with none)."""
    ce, _ = token_losses(logits, labels)  # 0 where not counted
    return (ce.sum(-1) / counts.clamp(min=1).to(ce.dtype)).sum()


@dataclass
class _LoraPair:
    """One active adapter of one LoRA layer: ``u = lora_B(lora_A(dropout(x)))``."""

    name: str
    lora_a: nn.Linear
    lora_b: nn.Linear

    def params(self) -> Iterator[nn.Parameter]:
        yield from self.lora_a.parameters()
        yield from self.lora_b.parameters()


def _lora_pairs(model: nn.Module) -> list[_LoraPair]:
    """The active LoRA (A, B) pairs of ``model``; refuses layer kinds the hooks cannot handle."""
    from peft.tuners.lora import LoraLayer

    pairs: list[_LoraPair] = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or module.disable_adapters:
            continue
        for adapter in module.active_adapters:
            pair = _pair_of(name, module, adapter)
            if pair is not None:
                pairs.append(pair)
    return pairs


def _pair_of(name: str, module: Any, adapter: str) -> _LoraPair | None:
    where = f"{name} (adapter {adapter!r})"
    if adapter in getattr(module, "lora_embedding_A", {}):
        raise ModelError(
            f"{where}: LoRA on embeddings is not supported by effort; target Linear layers"
        )
    if adapter not in module.lora_A:
        return None
    if getattr(module, "merged", False):
        raise ModelError(
            f"{where}: the adapter is merged into the weights; unmerge it before scoring"
        )
    if adapter in getattr(module, "lora_variant", {}):
        raise ModelError(
            f"{where}: LoRA variants (DoRA, ...) are not supported by effort; use plain LoRA"
        )
    lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
        raise ModelError(f"{where}: only LoRA on Linear layers is supported by effort")
    return _LoraPair(name, lora_a, lora_b)


@dataclass
class _Call:
    """What the forward hooks saw in one call of one LoRA pair."""

    key: int
    x: Tensor | None = None  # input of lora_A, [B, T, d_in]
    h: Tensor | None = None  # output of lora_A, [B, T, r]


@dataclass
class _Tracker:
    """Captures LoRA activations in the forward and turns gradients into per-sample norms."""

    valid: Tensor  # [B, T] bool: real (non-padding) positions
    shape: tuple[int, ...]  # (B, T)
    # Trailing positions whose logits are computed: a LoRA layer on the lm_head sees only these.
    keep: int | None = None
    calls: list[_Call] = field(default_factory=list)
    n_calls: dict[int, int] = field(default_factory=dict)
    sq: Tensor | None = None  # running sum of squared norms, [B] float64
    shared: dict[tuple[int, str], Tensor] = field(default_factory=dict)
    masks: dict[tuple[torch.device, torch.dtype, int], Tensor] = field(default_factory=dict)

    def attach(self, pair: _LoraPair) -> list[RemovableHandle]:
        key = len(self.n_calls)
        self.n_calls[key] = 0

        def a_hook(_module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
            return self._on_a(key, args[0], out)

        def b_hook(_module: nn.Module, _args: tuple[Tensor, ...], out: Tensor) -> None:
            self._on_b(key, pair.lora_b, out)

        return [
            pair.lora_a.register_forward_hook(a_hook),
            pair.lora_b.register_forward_hook(b_hook),
        ]

    def grad_inputs(self) -> list[Tensor]:
        return [c.h for c in self.calls if c.h is not None and c.h.requires_grad]

    def _on_a(self, key: int, x: Tensor, h: Tensor) -> Tensor:
        batch, length = self.shape
        # [B, keep] is a layer after the logits_to_keep slice (LoRA on the lm_head): its
        # positions are the last `keep` ones, which _mask aligns by taking the trailing columns.
        lengths = {length} if self.keep is None else {length, self.keep}
        if x.dim() != 3 or x.shape[0] != batch or x.shape[1] not in lengths:
            raise ModelError(
                f"a LoRA layer saw input of shape {tuple(x.shape)}, not [batch, tokens, features] "
                f"{self.shape}; effort cannot split its gradient per sample"
            )
        if not h.requires_grad:
            # Frozen adapter at the start of the network: nothing upstream needs a gradient, so a
            # fresh leaf is enough for the backward to reach this layer.
            h = h.detach().requires_grad_(True)
        self.n_calls[key] += 1
        call = _Call(key=key, x=x, h=h)
        self.calls.append(call)
        h.register_hook(lambda g_h: self._grad_a(call, g_h))
        return h

    def _on_b(self, key: int, lora_b: nn.Linear, u: Tensor) -> None:
        call = self.calls[-1] if self.calls else None
        if call is None or call.key != key:
            raise ModelError("a lora_B ran without its lora_A just before; effort cannot pair them")
        u.register_hook(lambda g: self._grad_b(call, lora_b, g))

    def _grad_b(self, call: _Call, lora_b: nn.Linear, g: Tensor) -> None:
        """dL/dB per sample from g = dL/du (and dL/db if lora_B has a bias).

        Formed as ``h^T g`` ([B, r, d_out], the transpose of dL/dB: same norm), the cheaper
        order for a batched matmul.
        """
        assert call.h is not None
        g = _compute_dtype(g)
        self._add(call.key, "B", self._masked(call.h).transpose(1, 2) @ g)
        if lora_b.bias is not None:
            self._add(call.key, "b", self._mask(g)[:, None, :] @ g)

    def _grad_a(self, call: _Call, g_h: Tensor) -> None:
        """dL/dA per sample, ``(dL/dh)^T x`` ([B, r, d_in]); autograd gives dL/dh = B^T g."""
        assert call.x is not None
        self._add(call.key, "A", self._masked(g_h).transpose(1, 2) @ _compute_dtype(call.x))
        call.x = call.h = None  # free the activations as soon as the layer is done

    def _add(self, key: int, part: str, grad: Tensor) -> None:
        """Add a per-sample gradient ``[B, ...]``; a layer called twice sums before the norm."""
        if self.n_calls[key] > 1:
            slot = (key, part)
            self.shared[slot] = grad if slot not in self.shared else self.shared[slot] + grad
            return
        self._add_sq(grad)

    def _add_sq(self, grad: Tensor) -> None:
        sq = grad.square().sum((1, 2)).double()
        self.sq = sq if self.sq is None else self.sq + sq

    def finish(self) -> Tensor:
        for grad in self.shared.values():
            self._add_sq(grad)
        if self.sq is None:  # no LoRA layer took part in the loss: its gradient is 0
            return torch.zeros(self.shape[0], dtype=torch.float64)
        return self.sq

    def clear(self) -> None:
        self.calls.clear()
        self.shared.clear()
        self.masks.clear()

    def _mask(self, like: Tensor) -> Tensor:
        """The real-position mask ``[B, L]`` for ``like`` (``[B, L, ...]``), in its dtype and device.

        ``L`` is ``T``, or ``keep`` for a layer past the logits slice: then the last ``keep``
        columns. Made once per kind.
        """
        length = like.shape[1]
        kind = (like.device, like.dtype, length)
        if kind not in self.masks:
            valid = self.valid[:, self.valid.shape[1] - length :]
            self.masks[kind] = valid.to(device=like.device, dtype=like.dtype)
        return self.masks[kind]

    def _masked(self, t: Tensor) -> Tensor:
        """``t`` ([B, T, r], small) in the compute dtype with padding positions zeroed.

        Their gradient is exactly 0 anyway; zeroing guards against attention kernels that leave
        rounding noise at fully masked positions.
        """
        t = _compute_dtype(t)
        return t * self._mask(t)[..., None]


def _compute_dtype(t: Tensor) -> Tensor:
    """Half-precision activations are summed in float32; float32/float64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
