"""The kinds of per-sample model output speccore computes, registered in one place.

An output is a function of a model (with its adapter in use) and one collated batch that returns
one value per row: a score (``[B]``: effort, loss, EL2N) or a vector (``[B, D]``: embeddings).
:func:`register_output` records it with the version of its code, and everything else takes it
from here: the batch loop (:func:`~speccore.scoring.runner.score_samples`), the Ray engine, the
cache (the version goes into every key, so a fix retires old values), the provider that serves
methods' :class:`~speccore.selection.base.ModelWork` requests, and the dry run that times it.
A method that needs a new kind of output registers one function, here or in its own module.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from ..utils.cache import register_version
from ..utils.errors import ConfigError

#: ``fn(model, batch)``, or ``fn(model, batch, keep=...)`` taking the response window read on
#: the host (the batch loop hands it over when the function accepts it).
BatchFunction = Callable[..., Tensor]


@dataclass(frozen=True)
class Output:
    """One registered kind of output."""

    name: str
    batch: BatchFunction
    version: int
    vector: bool  # [B, D] per batch (an embedding) rather than [B] (a score)
    description: str


OUTPUTS: dict[str, Output] = {}

#: The scalar outputs' batch functions by name: what the batch loops call (and tests wrap).
SCORE_FUNCTIONS: dict[str, BatchFunction] = {}


def register_output(
    name: str, *, version: int, description: str, vector: bool = False
) -> Callable[[BatchFunction], BatchFunction]:
    """Decorator: make ``fn(model, batch)`` the output called ``name``.

    ``version`` goes into every cache key of its values: bump it whenever the function's
    results change. A name registered twice is refused.
    """

    def add(fn: BatchFunction) -> BatchFunction:
        if name in OUTPUTS:
            raise ValueError(f"model output {name!r} registered twice")
        OUTPUTS[name] = Output(name, fn, version, vector, description)
        if not vector:
            SCORE_FUNCTIONS[name] = fn
        register_version(name, version)
        return fn

    return add


def get_output(name: str) -> Output:
    """The output called ``name``; an unknown name lists the valid ones."""
    try:
        return OUTPUTS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(OUTPUTS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(
            f"unknown model output {name!r}{hint}; valid outputs: {', '.join(sorted(OUTPUTS))}"
        ) from None


def batch_function(name: str) -> BatchFunction:
    """The batch function of output ``name`` (a scalar one from :data:`SCORE_FUNCTIONS`, so a
    wrapped entry is what runs)."""
    output = get_output(name)
    return output.batch if output.vector else SCORE_FUNCTIONS[name]
