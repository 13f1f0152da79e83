"""How a fine-tune cuts its rows into batches: by tokens (the default) or by rows.

Token batching fills a budget of padded tokens with rows of similar length, as Hugging Face's
``group_by_length`` and fairseq's ``max_tokens`` do: each epoch shuffles the rows (seed
``seed + epoch``), sorts every window of :data:`WINDOW_BATCHES` ``· batch_size`` consecutive
rows by length, cuts each sorted window into batches of at most ``batch_tokens`` padded tokens,
and shuffles the batches. Padding falls from about 1.45× (random rows of 8) to a few percent,
while the batches of an epoch still come in random order.

The budget ``batch_tokens = 0`` (the default) means ``batch_size`` rows of the data's mean
length: an epoch then has about as many optimizer steps as row batching gave it, so the learning
rate, the schedule and the selection quality tuned for batches of 8 rows carry over, on any
device (a budget sized from device memory would make the adapter depend on the device and, on a
large GPU, leave a few thousand rows with a handful of steps). Raise ``--batch-tokens`` to trade
steps for speed on a GPU. The forward passes themselves are capped separately
(``max_batch_tokens``: memory only, same result); :func:`memory_batch_tokens` sizes that cap
from free device memory.

Every plan is a list of optimizer steps, each a list of batches (arrays of row indices), known
up front: the learning-rate schedule runs over ``len(plan)`` steps whatever the batch shapes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..utils.errors import ConfigError

#: Rows sorted together, in batches of ``batch_size`` rows: Hugging Face's megabatch factor.
WINDOW_BATCHES = 50

#: Token batching ("tokens") or ``batch_size`` rows in random order ("rows", the old plan).
BATCHINGS = ("tokens", "rows")

#: Share of free device memory a memory-sized forward may fill (the rest: allocator slack,
#: the optimizer, kernels' workspaces).
MEMORY_SHARE = 0.6

#: Bounds of a memory-sized forward, in padded tokens.
MIN_MEMORY_TOKENS, MAX_MEMORY_TOKENS = 1024, 65536


def plan_batches(lengths: np.ndarray | int, settings: Any) -> list[list[np.ndarray]]:
    """The row indices of every batch, grouped by optimizer step (``grad_accum`` per step).

    ``lengths`` are the rows' token counts; an ``int`` (a row count) only serves row
    batching, whose plan ignores lengths.
    """
    if settings.batching == "rows":
        n = lengths if isinstance(lengths, int) else len(lengths)
        batches = _row_batches(n, settings)
    elif isinstance(lengths, int):
        raise ConfigError("token batching needs the rows' lengths, not only their number")
    else:
        batches = _token_plan(np.asarray(lengths, dtype=np.int64), settings)
    k = settings.grad_accum
    return [batches[i : i + k] for i in range(0, len(batches), k)]


def _row_batches(n: int, settings: Any) -> list[np.ndarray]:
    """``ceil(epochs · ceil(n / batch_size))`` batches of ``batch_size`` rows, epoch ``e`` a
    permutation seeded with ``seed + e``."""
    per_epoch = math.ceil(n / settings.batch_size)
    total = max(1, math.ceil(settings.epochs * per_epoch - 1e-9))
    batches: list[np.ndarray] = []
    epoch = 0
    while len(batches) < total:
        order = np.random.default_rng(settings.seed + epoch).permutation(n)
        for start in range(0, n, settings.batch_size):
            batches.append(order[start : start + settings.batch_size])
        epoch += 1
    return batches[:total]


def _token_plan(lengths: np.ndarray, settings: Any) -> list[np.ndarray]:
    """Whole epochs of :func:`token_batches`, then ``ceil(fraction · its batches)`` of the
    next one (at least one batch in all)."""
    budget = batch_budget(lengths, settings)
    window = WINDOW_BATCHES * settings.batch_size
    full, fraction = divmod(settings.epochs, 1.0)
    if fraction > 1 - 1e-9:  # 2.9999999999 epochs are 3
        full, fraction = full + 1, 0.0
    batches: list[np.ndarray] = []
    epoch = 0
    while epoch < int(full):
        batches += token_batches(lengths, budget, window, settings.seed + epoch)
        epoch += 1
    if fraction > 1e-9 or not batches:
        last = token_batches(lengths, budget, window, settings.seed + epoch)
        batches += last[: max(1, math.ceil(fraction * len(last) - 1e-9))]
    return batches


def batch_budget(lengths: np.ndarray, settings: Any) -> int:
    """Padded tokens per batch: ``batch_tokens``, or when 0, ``batch_size`` rows of the mean
    length (rounded up)."""
    if settings.batch_tokens > 0:
        return int(settings.batch_tokens)
    mean = float(lengths.mean()) if len(lengths) else 1.0
    return max(1, math.ceil(settings.batch_size * mean))


def token_batches(lengths: np.ndarray, budget: int, window: int, seed: int) -> list[np.ndarray]:
    """One epoch of length-grouped batches of at most ``budget`` padded tokens (a row longer
    than the budget gets a batch of its own), in an order shuffled with ``seed``."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    batches: list[np.ndarray] = []
    for start in range(0, len(order), window):
        rows = order[start : start + window]
        rows = rows[np.argsort(lengths[rows], kind="stable")]
        batches += _fill(rows, lengths, budget)
    return [batches[i] for i in rng.permutation(len(batches))]


def _fill(rows: np.ndarray, lengths: np.ndarray, budget: int) -> list[np.ndarray]:
    """Cut rows sorted by length into consecutive batches of at most ``budget`` padded
    tokens (``rows in batch · longest``)."""
    out: list[np.ndarray] = []
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or (i - start + 1) * int(lengths[rows[i]]) > budget:
            out.append(rows[start:i])
            start = i
    return out


def padded_tokens(lengths: np.ndarray, batches: list[np.ndarray]) -> tuple[int, int]:
    """(real tokens, padded tokens) of ``batches`` of row indices."""
    real = sum(int(lengths[b].sum()) for b in batches if len(b))
    padded = sum(len(b) * int(lengths[b].max()) for b in batches if len(b))
    return real, padded


# --- memory-sized forwards ---------------------------------------------------------------------


def bytes_per_token(config: Any, dtype_bytes: int = 2, logit_share: float = 1.0) -> float:
    """Device memory one padded token needs in a LoRA forward+backward, estimated.

    Per layer, the activations a LoRA backward keeps: about 10 hidden-sized tensors (norm
    inputs and outputs, q, k, v, attention output, residuals, LoRA inputs) and 4 of the MLP's
    width (gate, up, activation, product), in the model's dtype. Then the logits a loss reads
    (``logit_share`` of the positions, the response window): the model-dtype logits, their
    float32 copy and its gradient, 10 bytes per vocabulary entry. Attention scores are not
    counted: SDPA and flash attention do not keep them. Within a factor 2 of what the device
    suite measured (0.5B Llama, 49k vocabulary: 8,192 tokens peaked at 12.7 GiB with 1 GiB of
    weights, about 1.5 MB per token).
    """
    hidden = int(config.hidden_size)
    width = int(getattr(config, "intermediate_size", 4 * hidden) or 4 * hidden)
    layers = int(config.num_hidden_layers)
    vocab = int(config.vocab_size)
    per_layer = dtype_bytes * (10 * hidden + 4 * width)
    return layers * per_layer + logit_share * vocab * 10.0


def memory_batch_tokens(config: Any, free_bytes: int, dtype_bytes: int = 2) -> int:
    """Padded tokens per forward that fit :data:`MEMORY_SHARE` of ``free_bytes``: a power of two
    (so that the same device gives the same cap from run to run, though free memory drifts a
    little), within [:data:`MIN_MEMORY_TOKENS`, :data:`MAX_MEMORY_TOKENS`]."""
    fits = MEMORY_SHARE * free_bytes / bytes_per_token(config, dtype_bytes)
    tokens = 2 ** math.floor(math.log2(max(fits, 1.0)))
    return int(min(MAX_MEMORY_TOKENS, max(MIN_MEMORY_TOKENS, tokens)))


#: Padded tokens per forward on a CPU (or a device without a memory reading), measured: it
#: keeps a 262k-vocabulary target (Gemma) under ~7 GB.
CPU_BATCH_TOKENS = 1024


def resolve_batch_tokens(setting: int, model: Any) -> int:
    """``--max-batch-tokens``: the setting, or for 0 (auto) the memory-sized cap on a CUDA
    device (:func:`device_batch_tokens`), else :data:`CPU_BATCH_TOKENS`. A micro-batch cap
    changes only the rounding of a step's gradient, never which rows form a step."""
    if setting > 0:
        return int(setting)
    return device_batch_tokens(model) or CPU_BATCH_TOKENS


def device_batch_tokens(model: Any) -> int | None:
    """:func:`memory_batch_tokens` for ``model`` on its CUDA device, from the memory free now;
    None on other devices (a CPU forward is not capped by this)."""
    import torch

    param = next(model.parameters(), None)
    if param is None or param.device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(param.device)
    config = getattr(model, "config", None)
    if config is None:
        return None
    return memory_batch_tokens(config, int(free), param.element_size())
