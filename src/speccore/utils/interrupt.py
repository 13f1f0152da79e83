"""Stop a long run cleanly on SIGTERM or SIGINT: finish the batch, save it, raise one exception.

Inside :func:`interruptible`, the first SIGTERM or SIGINT (Ctrl-C) does not kill the run: it
only marks a stop as requested. The loops that checkpoint (scoring, fine-tuning) call
:func:`stop_point` between units of work; at the first such point after the signal they save
their progress and :func:`stop_point` raises :class:`Interrupted`, which carries how much is
saved. Loops that keep nothing of a unit in progress (a bench's generation, the bench's loop over
cells) call :func:`check` instead and stop at once. A second signal raises :class:`Interrupted` at once (the loops' exception handlers still
keep what they finished). Outside :func:`interruptible` nothing changes: Ctrl-C raises
``KeyboardInterrupt`` as usual and SIGTERM ends the process.

Usage (the CLI maps the exception to one line and exit code ``exc.exit_code``, 130 or 143)::

    with interruptible():
        run_the_command()
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType

logger = logging.getLogger(__name__)

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A run stopped by a signal after saving its progress.

    A ``BaseException`` (like ``KeyboardInterrupt``), so that no ``except Exception`` on the way
    up swallows it. Attributes: ``signum`` (the signal), ``done`` and ``total`` (units of work
    saved and planned; ``total`` 0 when no loop had reported yet), ``unit`` ("samples",
    "steps"), ``exit_code`` (128 + signal number: 130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int, done: int = 0, total: int = 0, unit: str = "samples") -> None:
        self.signum = int(signum)
        self.done, self.total, self.unit = int(done), int(total), unit
        self.note: str | None = None
        super().__init__(self.message)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @property
    def message(self) -> str:
        """``interrupted: 16 of 24 samples saved; rerun the same command to resume``."""
        if self.note:
            return f"interrupted: {self.note}; rerun the same command to start again"
        if self.total:
            return (
                f"interrupted: {self.done} of {self.total} {self.unit} saved; "
                "rerun the same command to resume"
            )
        return "interrupted before any progress was saved; rerun the same command"

    def update(self, done: int, total: int, unit: str) -> None:
        """Set what is saved (a loop that kept more on its way out calls this)."""
        self.done, self.total, self.unit = int(done), int(total), unit
        self.args = (self.message,)

    def nothing_kept(self, why: str) -> None:
        """Say that the interrupted work is not kept (``why``): a rerun starts it again."""
        self.note = why
        self.args = (self.message,)

    def __str__(self) -> str:
        return self.message


@dataclass
class _Guard:
    """The state of the active :func:`interruptible` block."""

    pending: int | None = None  # the first stop signal received, if any
    done: int = 0  # the last progress a loop reported as saved
    total: int = 0
    unit: str = "samples"

    def interrupted(self, signum: int) -> Interrupted:
        return Interrupted(signum, self.done, self.total, self.unit)


_guard: _Guard | None = None


@contextlib.contextmanager
def interruptible(signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Turn ``signals`` into a requested stop for the block (see the module docstring).

    Re-entrant: an inner block inside an active one changes nothing. Signal handlers can only
    be set from the main thread; elsewhere the block runs without them. A stop requested but
    never reached by a loop (the signal came during work without stop points) raises
    :class:`Interrupted` when the block ends.
    """
    global _guard
    if _guard is not None or threading.current_thread() is not threading.main_thread():
        yield
        return
    guard = _guard = _Guard()
    previous = {s: signal.signal(s, _handler) for s in signals}
    try:
        yield
    finally:
        _guard = None
        for s, handler in previous.items():
            signal.signal(s, handler)
    if guard.pending is not None:
        raise guard.interrupted(guard.pending)


def stop_requested() -> bool:
    """Whether a stop signal arrived inside the active :func:`interruptible` block."""
    return _guard is not None and _guard.pending is not None


def report(done: int, total: int, unit: str = "samples") -> None:
    """Record how much of a loop's work is saved (what :class:`Interrupted` will say)."""
    if _guard is not None:
        _guard.done, _guard.total, _guard.unit = int(done), int(total), unit


def stop_point(save: Callable[[], int], total: int, unit: str = "samples") -> None:
    """Call between two units of work: if a stop was requested, ``save()`` and raise.

    ``save`` writes the loop's progress and returns how many of the ``total`` units are saved.
    Costs one attribute read when no stop is requested.
    """
    if _guard is None or _guard.pending is None:
        return
    report(save(), total, unit)
    raise _guard.interrupted(_guard.pending)


def check() -> None:
    """Call between two units of work whose unfinished part is not kept (a bench cell's
    generation): if a stop was requested, raise at once with what was last :func:`report`-ed
    as saved. Costs one attribute read when no stop is requested."""
    if _guard is not None and _guard.pending is not None:
        raise _guard.interrupted(_guard.pending)


def _handler(signum: int, _frame: FrameType | None) -> None:
    guard = _guard
    if guard is None:  # the block ended between the signal and this call: stop as asked
        raise Interrupted(signum)
    if guard.pending is None:
        guard.pending = signum
        logger.warning(
            "%s received: stopping once the current batch is saved (send it again to stop now)",
            signal.Signals(signum).name,
        )
        return
    raise guard.interrupted(signum)
