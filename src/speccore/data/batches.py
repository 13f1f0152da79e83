"""The tokenised dataset every scorer and trainer consumes, and its batching.

:class:`BatchLoop` is the one loop over batches of a :class:`TokenizedData` (scoring,
embeddings, token losses, fine-tuning, generation): a plan of length-grouped batches
(:func:`length_grouped_batches`), each collated and moved to the device, with a progress bar
that estimates the time left.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
import torch

from ..utils.errors import ConfigError
from ..utils.io import fingerprint
from ..utils.progress import progress

IGNORE_INDEX = -100


@dataclass
class TokenizedData:
    """Prompt + response token ids per sample; ``labels`` is ``-100`` on the prompt.

    ``token_masks`` (optional) holds, per sample, a 0/1 mask over positions: positions with 0 get
    label ``-100`` when batched (token-level selection).
    """

    input_ids: list[list[int]]
    labels: list[list[int]]
    pad_token_id: int
    token_masks: list[list[int]] | None = None
    _fp: str | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.input_ids], dtype=np.int64)

    @property
    def n_response_tokens(self) -> np.ndarray:
        return np.array(
            [sum(1 for t in lab if t != IGNORE_INDEX) for lab in self.labels], dtype=np.int64
        )

    def fingerprint(self) -> str:
        """A digest of the token ids and labels (cache key part)."""
        if self._fp is None:
            flat_ids = np.concatenate([np.asarray(x, dtype=np.int64) for x in self.input_ids])
            flat_lab = np.concatenate([np.asarray(x, dtype=np.int64) for x in self.labels])
            self._fp = fingerprint(self.lengths, flat_ids, flat_lab)
        return self._fp

    def subset(self, indices: Sequence[int] | np.ndarray) -> TokenizedData:
        idx = [int(i) for i in indices]
        masks = None if self.token_masks is None else [self.token_masks[i] for i in idx]
        return TokenizedData(
            input_ids=[self.input_ids[i] for i in idx],
            labels=[self.labels[i] for i in idx],
            pad_token_id=self.pad_token_id,
            token_masks=masks,
        )


def sample_indices(indices: Sequence[int] | np.ndarray | None, n: int) -> np.ndarray:
    """``indices`` as a 1-D int64 array of sample positions (all ``n`` when None); anything
    that is not an integer index inside ``0..n-1`` raises :class:`ConfigError`."""
    if indices is None:
        return np.arange(n, dtype=np.int64)
    idx = np.asarray(indices)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise ConfigError("indices must be a 1-D array of integer sample indices")
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        bad = idx[(idx < 0) | (idx >= n)][0]
        raise ConfigError(f"indices holds {bad}, outside the data's 0..{n - 1}")
    return idx


def length_grouped_batches(
    lengths: Sequence[int] | np.ndarray,
    max_batch_tokens: int,
    max_batch_size: int | None = None,
    indices: Sequence[int] | np.ndarray | None = None,
    longest_first: bool = False,
) -> list[np.ndarray]:
    """Group samples of similar length so a padded batch wastes little compute.

    Samples are sorted by length (stable, so ties keep input order; ``longest_first`` sorts
    from the longest, so that a batch too large for memory fails at once) and cut into batches
    whose padded size ``len(batch) * max_len`` stays within ``max_batch_tokens`` and whose size
    stays within ``max_batch_size`` (a single longer sample still gets a batch of its own).
    Returns arrays of sample indices (of positions into ``lengths``).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    idx = np.arange(len(lengths)) if indices is None else np.asarray(indices, dtype=np.int64)
    key = -lengths[idx] if longest_first else lengths[idx]
    order = idx[np.argsort(key, kind="stable")]
    batches: list[np.ndarray] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = int(lengths[i])
        new_longest = max(longest, n)
        too_many = max_batch_size is not None and len(current) >= max_batch_size
        if current and (new_longest * (len(current) + 1) > max_batch_tokens or too_many):
            batches.append(np.array(current, dtype=np.int64))
            current, new_longest = [], n
        current.append(int(i))
        longest = new_longest
    if current:
        batches.append(np.array(current, dtype=np.int64))
    return batches


def collate(
    data: TokenizedData,
    indices: Sequence[int] | np.ndarray,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """Pad the samples at ``indices`` into ``input_ids``, ``attention_mask`` and ``labels``.

    Padding is marked by the attention mask and ``-100`` labels, never by comparing with the pad
    id: SmolLM2 pads with its EOS id, and EOS is a real label we train on. A token mask, if
    present, turns masked positions into ``-100`` labels.
    """
    idx = [int(i) for i in indices]
    longest = max(len(data.input_ids[i]) for i in idx)
    ids = torch.full((len(idx), longest), data.pad_token_id, dtype=torch.long)
    att = torch.zeros((len(idx), longest), dtype=torch.long)
    lab = torch.full((len(idx), longest), IGNORE_INDEX, dtype=torch.long)
    for row, i in enumerate(idx):
        seq = data.input_ids[i]
        labels = list(data.labels[i])
        if data.token_masks is not None:
            labels = [
                t if m else IGNORE_INDEX for t, m in zip(labels, data.token_masks[i], strict=True)
            ]
        n = len(seq)
        sl = slice(0, n) if padding_side == "right" else slice(longest - n, longest)
        ids[row, sl] = torch.tensor(seq, dtype=torch.long)
        att[row, sl] = 1
        lab[row, sl] = torch.tensor(labels, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


@dataclass(frozen=True)
class Batch:
    """One batch of a :class:`BatchLoop`.

    ``number`` is its place in the plan, ``rows`` the plan's entry (positions into the loop's
    ``indices``, or sample indices when it has none), ``samples`` the sample indices into the
    data, ``tensors`` the collated batch (``input_ids``, ``attention_mask``, ``labels``) on the
    loop's device. ``keep`` is the batch's response window when the loop was given ``window``
    (e.g. :func:`speccore.scoring.losses.kept_positions`), read from the labels on the host: pass
    it on as ``keep=`` so that no device-to-host sync computes it again.
    """

    number: int
    rows: np.ndarray
    samples: np.ndarray
    tensors: dict[str, torch.Tensor]
    keep: int | None = None

    def __len__(self) -> int:
        return len(self.rows)


def copy_mode(device: torch.device) -> tuple[bool, bool]:
    """(pin the host tensor, copy without blocking) for a copy to ``device``: both on CUDA only
    (pinning costs a host copy that only pays off for an asynchronous transfer)."""
    cuda = device.type == "cuda"
    return cuda, cuda


def to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``tensors`` on ``device``; on CUDA pinned and non-blocking, so the host collates the next
    batch while the GPU works (the caching host allocator keeps a pinned block alive until its
    copy is done); on the CPU, no copy."""
    pin, non_blocking = copy_mode(device)
    out = {}
    for k, v in tensors.items():
        if pin and v.device.type == "cpu":
            v = v.pin_memory()
        out[k] = v.to(device, non_blocking=non_blocking)
    return out


class BatchLoop:
    """Iterate over the batches of ``plan``: collated, on ``device``, with a progress bar.

    ``plan`` lists batches of positions into ``indices`` (of sample indices when ``indices`` is
    None), e.g. from :func:`length_grouped_batches`. Batches whose number is in ``skip`` (done
    before a resume) are neither collated nor counted again: the bar starts at their size. The
    bar (unit ``unit``, one per row) advances once the caller is done with a batch, so its
    estimate of the time left reflects finished work; :func:`speccore.utils.progress.set_quiet` hides
    it. Use it as a context manager, so that the bar is closed even when the loop body raises::

        with BatchLoop(data, plan, device=device, desc="loss") as loop:
            for batch in loop:
                ...
    """

    def __init__(
        self,
        data: TokenizedData,
        plan: Sequence[np.ndarray],
        *,
        indices: np.ndarray | None = None,
        device: torch.device | str | None = None,
        padding_side: str = "right",
        skip: Collection[int] = (),
        desc: str = "batches",
        unit: str = "sample",
        leave: bool = True,
        window: Callable[[torch.Tensor], int] | None = None,
    ) -> None:
        self.data, self.plan, self.indices = data, plan, indices
        self.window = window
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.padding_side = padding_side
        self.skip = skip
        total = sum(len(rows) for rows in plan)
        done = sum(len(plan[b]) for b in skip if 0 <= b < len(plan))
        self.bar = progress(total=total, initial=done, desc=desc, unit=unit, leave=leave)

    def __iter__(self) -> Iterator[Batch]:

        try:
            for number, rows in enumerate(self.plan):
                if number in self.skip:
                    continue
                rows = np.asarray(rows, dtype=np.int64)
                samples = rows if self.indices is None else self.indices[rows]
                batch = collate(self.data, samples, self.padding_side)
                # The response window from the host's labels: no device sync computes it.
                keep = None if self.window is None else self.window(batch["labels"])
                yield Batch(number, rows, samples, to_device(batch, self.device), keep)
                self.bar.update(len(rows))
        finally:
            self.bar.close()

    def set_postfix(self, **values: Any) -> None:
        """Show ``values`` (e.g. the last loss) after the bar."""
        self.bar.set_postfix(**values)

    def __enter__(self) -> BatchLoop:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.bar.close()
