"""Progress bars: one factory for every long loop, and one switch that silences them all.

Every progress bar in speccore comes from :func:`progress`, so ``speccore -q`` (which calls
``set_quiet(True)``) silences them together with the logs. The bars show the elapsed time and,
whenever the total is known, the estimated time left (tqdm's default ``[elapsed<remaining]``),
so callers must pass ``total`` when the iterable has no length.

``set_quiet`` also silences the progress bars of the Hugging Face libraries speccore drives
(huggingface_hub, and through it transformers when imported later; transformers and datasets
when already imported), so that ``-q`` means no bar at all. A library that calls ``tqdm``
directly (transformers' GGUF dequantisation does) is out of its reach.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_quiet = False
_hidden: list[Callable[[], None]] = []  # how to show again the library bars set_quiet hid


def set_quiet(quiet: bool) -> None:
    """Silence (True) or show (False) every progress bar created from now on."""
    global _quiet
    if bool(quiet) != _quiet:
        _quiet = bool(quiet)
        _set_library_bars(enabled=not _quiet)


def is_quiet() -> bool:
    """Whether progress bars are silenced (see :func:`set_quiet`)."""
    return _quiet


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | float | None = None,
    desc: str | None = None,
    unit: str = "it",
    initial: int | float = 0,
    leave: bool = True,
    disable: bool = False,
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar over ``iterable`` (or a manual one, advanced with ``update``) with an ETA.

    ``total`` defaults to ``len(iterable)`` where it has one; ``disable=True`` hides this bar
    alone (e.g. for a loop too short to be worth one); :func:`set_quiet` hides all of them.
    Other keyword arguments go to tqdm unchanged.
    """
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        initial=initial,
        leave=leave,
        disable=disable or _quiet,
        dynamic_ncols=True,
        **kwargs,
    )


def _set_library_bars(enabled: bool) -> None:
    """Hide the Hugging Face libraries' own bars, or show again those this module hid (a bar
    the user turned off stays off)."""
    if enabled:
        while _hidden:
            _hidden.pop()()
        return
    from huggingface_hub import utils as hub_utils

    # transformers reads the hub's switch when it is imported; afterwards it has its own.
    if not hub_utils.are_progress_bars_disabled():
        hub_utils.disable_progress_bars()
        _hidden.append(hub_utils.enable_progress_bars)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            _hidden.append(hf_logging.enable_progress_bar)
    if "datasets" in sys.modules:
        import datasets

        if datasets.is_progress_bar_enabled():
            datasets.disable_progress_bars()
            _hidden.append(datasets.enable_progress_bars)
