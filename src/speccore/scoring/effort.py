"""STAFF's effort score: the L2 norm of each sample's loss gradient w.r.t. the LoRA parameters.

:func:`effort_batch` gets every sample's gradient norm from one forward and one backward pass of
the whole batch. A LoRA layer computes ``y = W x + s * B (A x)`` (``s = lora_alpha / r``, the
``scaling``). With ``h = A x`` and ``u = B h`` (the output of ``lora_B``, before ``s``), and
``g_t = dL/du_t``, the per-sample gradients are sums over that sample's positions::

    dL_d/dB = sum_t g_t h_t^T              # [d_out, r]
    dL_d/dA = sum_t (B^T g_t) x_t^T        # [r, d_in];  B^T g_t = dL/dh_t

The scaling needs no special care: ``g`` is taken at ``u``, i.e. *before* the multiplication by
``s``, so it already carries the factor ``s`` once, exactly as the parameter gradient does. The
loss of the backward is the sum over samples of each sample's *summed* token losses
``n_d L_d`` (``n_d`` its response tokens), so each sample's rows of ``g`` belong to that sample's
loss alone (samples do not interact in a forward pass); the norm is divided by ``n_d`` at the end.
Summed rather than averaged so that the gradients are ``n_d`` times those of the mean loss: in
float16 the logit gradients ``(p - e_y) / n_d`` of a long response would otherwise fall into the
subnormal range and lose their digits; the division afterwards is exact.

Forward hooks wrap every ``h`` and ``u`` in an identity autograd function (a *tap*) whose backward
computes the layer's per-sample gradient while the backward runs, so no ``[B, T, d_out]``
gradient outlives its layer and no ``.grad`` is written: the backward is asked only for the
(small) gradients at ``h``, which it must pass ``u`` to reach. A tap keeps the activation it
needs (``x`` or ``h``) as a saved tensor, so gradient checkpointing drops and recomputes it like
any other; a recomputed forward runs the hooks again but its taps never see a backward.
Per-sample pieces are formed in float32 whatever the model's dtype.
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

from ..data.batches import IGNORE_INDEX
from ..models.speed import eager_forward
from ..utils.errors import ModelError
from .losses import eval_mode, forward, kept_positions, response_loss, token_losses
from .outputs import register_output

_NO_LORA = (
    "effort needs a model with active LoRA adapters: wrap it with peft.get_peft_model "
    "(and do not disable the adapters while scoring)"
)


@register_output(
    "effort", version=2, description="L2 norm of the loss gradient w.r.t. the LoRA parameters"
)  # 2: float32 accumulation of the per-sample gradient norms
def effort_batch(model: nn.Module, batch: dict[str, Tensor], keep: int | None = None) -> Tensor:
    """Per-sample effort ``||grad_phi L_d||_2`` (phi = the active LoRA A and B weights), ``[B]``.

    One forward and one backward for the whole batch; the model runs in eval mode (its modes are
    restored afterwards) and no ``.grad`` is left on any parameter. A sample with no response
    token gets ``nan``. Float64 on the CPU.

    Any model dtype: the per-sample gradient pieces are formed and summed in float32 and the loss
    is float32. With gradient checkpointing on
    (:func:`~speccore.models.lora.enable_gradient_checkpointing`) the checkpointed blocks
    recompute their activations in the backward, for the same scores. A compiled forward
    (``--compile``) is bypassed: the taps hold Python objects that a graph cannot.
    ``keep``: the response window when the caller knows it (the batch loop reads it on the
    host), else computed from the labels.
    """
    pairs = _lora_pairs(model)
    if not pairs:
        raise ModelError(_NO_LORA)
    labels = batch["labels"]
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    if keep is None:
        keep = kept_positions(labels)  # logits only over the response window
    tracker = _Tracker(valid=batch["attention_mask"].bool(), shape=tuple(labels.shape), keep=keep)
    handles: list[RemovableHandle] = []
    try:
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            eval_mode(model),
            eager_forward(model),
        ):
            _checkpointed_blocks_on(model)
            for pair in pairs:
                handles += tracker.attach(pair)
            # Every counted token's loss, summed: n_d L_d per sample (see the module notes).
            loss = response_loss(model, batch, keep).total
            tracker.recording = False  # forward hooks from here on are recomputes
            if tracker.inputs and loss.requires_grad:
                # Asking for dL/dh drives the backward through every tap; the returned [B, T, r]
                # tensors are small and dropped.
                torch.autograd.grad(loss, tracker.inputs, allow_unused=True)
        sq = tracker.finish()
    finally:
        for handle in handles:
            handle.remove()
        tracker.clear()
    # The backward ran on each sample's *sum* of token losses, n_d times its mean: divide here.
    n = counts.cpu().double()
    effort = sq.sqrt() / n.clamp(min=1)
    return torch.where(n > 0, effort, torch.full_like(effort, float("nan")))


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
    # grad(mean) = grad(sum) / n: the division is done in float64 after the norm, so that the
    # float32 loss does not round 1/n into the result.
    grads = torch.autograd.grad(ce[mask].sum(), params, allow_unused=True)
    total = sum(float(g.double().pow(2).sum()) for g in grads if g is not None)
    return total**0.5 / int(mask.sum())


def _checkpointed_blocks_on(model: nn.Module) -> None:
    """Switch on the blocks that gradient checkpointing wraps, inside :func:`eval_mode`.

    Hugging Face models checkpoint a block only while that block is in training mode. Only the
    block's own flag is set, not its children's: dropout (attention, LoRA) reads the flag of its
    own module, so it stays off. :func:`eval_mode` restores every flag afterwards.
    """
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            module.training = True


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


class _TapA(torch.autograd.Function):
    """Identity on ``h = lora_A(x)``; its backward turns ``dL/dh`` into per-sample ``dL/dA``.

    ``x`` is kept by ``save_for_backward``, not in a Python attribute: under gradient
    checkpointing a saved tensor is dropped after the forward and recomputed for the backward like
    every other activation of the block, so checkpointing saves this memory too. The backward runs
    once per call of the *original* forward: a recomputed forward builds a graph that no backward
    ever walks, so nothing is counted twice.
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, x: Tensor, tracker: _Tracker, key: int) -> Tensor:
        ctx.save_for_backward(x)
        ctx.tracker, ctx.key = tracker, key
        return h.view_as(h)

    @staticmethod
    def backward(ctx: Any, g_h: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        ctx.tracker.grad_a(ctx.key, g_h, x)
        return g_h, None, None, None


class _TapB(torch.autograd.Function):
    """Identity on ``u = lora_B(h)``; its backward turns ``g = dL/du`` into per-sample ``dL/dB``."""

    @staticmethod
    def forward(ctx: Any, u: Tensor, h: Tensor, tracker: _Tracker, key: int, bias: bool) -> Tensor:
        ctx.save_for_backward(h)
        ctx.tracker, ctx.key, ctx.bias = tracker, key, bias
        return u.view_as(u)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        (h,) = ctx.saved_tensors
        ctx.tracker.grad_b(ctx.key, h, g, ctx.bias)
        return g, None, None, None, None


_REENTRANT = (
    "a LoRA layer ran without autograd inside the forward: reentrant gradient checkpointing is "
    "not supported by effort; enable it with speccore.models.lora.enable_gradient_checkpointing "
    "(use_reentrant=False)"
)


@dataclass
class _Tracker:
    """Taps the LoRA layers in the forward and turns their gradients into per-sample norms.

    ``recording`` is True during the forward of the batch and False once the backward starts: a
    forward hook that fires after that is a gradient-checkpointing recompute, which must not
    count a call or ask for another gradient.
    """

    valid: Tensor  # [B, T] bool: real (non-padding) positions
    shape: tuple[int, ...]  # (B, T)
    # Trailing positions whose logits are computed: a LoRA layer on the lm_head sees only these.
    keep: int | None = None
    recording: bool = True
    n_calls: dict[int, int] = field(default_factory=dict)
    inputs: list[Tensor] = field(default_factory=list)  # lora_A outputs the backward must reach
    sq: dict[torch.device, Tensor] = field(default_factory=dict)  # squared norms per device
    shared: dict[tuple[int, str], Tensor] = field(default_factory=dict)
    masks: dict[tuple[torch.device, torch.dtype, int], Tensor] = field(default_factory=dict)

    def attach(self, pair: _LoraPair) -> list[RemovableHandle]:
        key = len(self.n_calls)
        self.n_calls[key] = 0
        bias = pair.lora_b.bias is not None

        def a_hook(_module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
            return self._on_a(key, args[0], out)

        def b_hook(_module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
            # lora_B's input is lora_A's (tapped) output h: peft computes lora_B(lora_A(x)).
            return _TapB.apply(out, args[0].detach(), self, key, bias)

        return [
            pair.lora_a.register_forward_hook(a_hook),
            pair.lora_b.register_forward_hook(b_hook),
        ]

    def _on_a(self, key: int, x: Tensor, h: Tensor) -> Tensor:
        if self.recording:
            self._check_input(x)
            if not torch.is_grad_enabled():
                raise ModelError(_REENTRANT)
            self.n_calls[key] += 1
        if not h.requires_grad:
            # Frozen adapter at the start of the network: nothing upstream needs a gradient, so a
            # fresh leaf is enough for the backward to reach this layer (done in a recompute too,
            # so that it saves the same tensors as the forward did).
            h = h.detach().requires_grad_(True)
        if self.recording:
            self.inputs.append(h)
        return _TapA.apply(h, x.detach(), self, key)

    def _check_input(self, x: Tensor) -> None:
        batch, length = self.shape
        # [B, keep] is a layer after the logits_to_keep slice (LoRA on the lm_head): its
        # positions are the last `keep` ones, which _mask aligns by taking the trailing columns.
        lengths = {length} if self.keep is None else {length, self.keep}
        if x.dim() != 3 or x.shape[0] != batch or x.shape[1] not in lengths:
            raise ModelError(
                f"a LoRA layer saw input of shape {tuple(x.shape)}, not [batch, tokens, features] "
                f"{self.shape}; effort cannot split its gradient per sample"
            )

    def grad_b(self, key: int, h: Tensor, g: Tensor, bias: bool) -> None:
        """dL/dB per sample from g = dL/du (and dL/db if lora_B has a bias).

        Formed as ``h^T g`` ([B, r, d_out], the transpose of dL/dB: same norm), the cheaper
        order for a batched matmul; in float32 at least, whatever the model's dtype.
        """
        g = _compute_dtype(g)
        self._add(key, "B", self._masked(h).transpose(1, 2) @ g)
        if bias:
            self._add(key, "b", self._mask(g)[:, None, :] @ g)

    def grad_a(self, key: int, g_h: Tensor, x: Tensor) -> None:
        """dL/dA per sample, ``(dL/dh)^T x`` ([B, r, d_in]); autograd gives dL/dh = B^T g."""
        self._add(key, "A", self._masked(g_h).transpose(1, 2) @ _compute_dtype(x))

    def _add(self, key: int, part: str, grad: Tensor) -> None:
        """Add a per-sample gradient ``[B, ...]``; a layer called twice sums before the norm."""
        if self.n_calls[key] > 1:
            slot = (key, part)
            self.shared[slot] = grad if slot not in self.shared else self.shared[slot] + grad
            return
        self._add_sq(grad)

    def _add_sq(self, grad: Tensor) -> None:
        # Summed where the layer lives (several devices under device_map="auto"): no transfer
        # and no host sync per layer; finish() brings the few [B] sums together.
        sq = grad.square().sum((1, 2)).double()
        held = self.sq.get(sq.device)
        self.sq[sq.device] = sq if held is None else held + sq

    def finish(self) -> Tensor:
        """Squared per-sample norms ``[B]``, float64 on the CPU."""
        for grad in self.shared.values():
            self._add_sq(grad)
        total = torch.zeros(self.shape[0], dtype=torch.float64)
        for sq in self.sq.values():  # none: no LoRA layer took part in the loss, gradient 0
            total += sq.cpu()
        return total

    def clear(self) -> None:
        self.inputs.clear()
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
    """Half-precision pieces are multiplied and summed in float32 (a bf16 square keeps 8 bits
    and a sum of many loses the small terms); float32/float64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
