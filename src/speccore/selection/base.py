"""The contract every selection method follows, and the method registry.

A method receives a :class:`ScoreProvider` (the data's scores, computed lazily and cached by the
pipeline: a test passes plain arrays instead), a budget ``m`` and a seed, and returns a
:class:`Selection`. Methods never load models themselves: that keeps each one a short, testable
transcription of its paper.
"""

from __future__ import annotations

import contextlib
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from ..errors import ConfigError
from ..io import write_json

if TYPE_CHECKING:
    import datasets

    from ..config import SelectConfig


class Verifier(Protocol):
    """The untuned target model, called only on the samples STAFF verifies."""

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        """Target-model scores of the samples at ``indices`` (same order)."""
        ...


class ScoreProvider(Protocol):
    """What a method may ask for. Every call is cached: asking twice costs nothing."""

    n: int
    config: SelectConfig

    def small_scores(self) -> np.ndarray:
        """Speculative scores of every sample on the task-tuned small model."""
        ...

    def verifier(self) -> Verifier:
        """Scores of given samples on the untuned target (fresh LoRA)."""
        ...

    def target_scores(self, score: str, tuned: bool) -> np.ndarray:
        """``score`` of every sample on the target, LoRA-tuned on the full data or not."""
        ...

    def target_embeddings(self) -> np.ndarray:
        """Mean last-layer hidden state over response tokens, tuned target, L2-normalised."""
        ...

    def stage(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Time a stage; the time lands in the Selection's ``timings``."""
        ...


@dataclass
class Selection:
    """A coreset: which samples to keep, and why."""

    method: str
    indices: np.ndarray
    n_total: int
    budget: int
    scores: np.ndarray | None = None
    regions: np.ndarray | None = None
    region_table: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.indices = np.sort(np.asarray(self.indices, dtype=np.int64))
        if len(np.unique(self.indices)) != len(self.indices):
            raise ValueError(f"{self.method}: selection holds duplicate indices")

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def mask(self) -> np.ndarray:
        keep = np.zeros(self.n_total, dtype=bool)
        keep[self.indices] = True
        return keep

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "n_total": self.n_total,
            "budget": self.budget,
            "n_kept": len(self),
            "indices": self.indices.tolist(),
            "scores": None if self.scores is None else [float(s) for s in self.scores],
            "regions": None if self.regions is None else self.regions.tolist(),
            "region_table": self.region_table,
            "info": self.info,
            "timings": self.timings,
            "config": self.config,
            "versions": self.versions,
        }

    def save(self, path: str | Path) -> None:
        """Write ``selection.json`` (atomically); ``path`` may be the file or its folder."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / "selection.json"
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Selection:
        path = Path(path)
        if path.is_dir():
            path = path / "selection.json"
        d = json.loads(path.read_text(encoding="utf-8"))
        return cls(
            method=d["method"],
            indices=np.asarray(d["indices"], dtype=np.int64),
            n_total=d["n_total"],
            budget=d["budget"],
            scores=None if d["scores"] is None else np.asarray(d["scores"], dtype=np.float64),
            regions=None if d["regions"] is None else np.asarray(d["regions"], dtype=np.int64),
            region_table=d["region_table"],
            info=d["info"],
            timings=d["timings"],
            config=d["config"],
            versions=d.get("versions", {}),
        )

    def to_dataset(self, dataset: datasets.Dataset) -> datasets.Dataset:
        """The kept rows of ``dataset`` (the data the selection was made on), in original order."""
        if len(dataset) != self.n_total:
            raise ConfigError(
                f"dataset has {len(dataset)} rows but the selection was made on {self.n_total}"
            )
        return dataset.select(self.indices.tolist())


class SelectionMethod(ABC):
    """One coreset method. Subclasses set ``name`` and implement :meth:`select`."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    @abstractmethod
    def select(self, provider: ScoreProvider, budget: int, seed: int) -> Selection:
        """Pick ``budget`` samples (or fewer, where the method allows) out of ``provider.n``."""


_REGISTRY: dict[str, type[SelectionMethod]] = {}


def register_method(cls: type[SelectionMethod]) -> type[SelectionMethod]:
    """Class decorator: make a method available by its ``name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"selection method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> SelectionMethod:
    """An instance of the method called ``name``; an unknown name lists the valid ones."""
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ConfigError(
            f"unknown selection method {name!r}; valid methods: {', '.join(method_names())}"
        ) from None


class StageTimer:
    """Wall time per named stage, *exclusive* of the stages nested in it.

    Methods time their own work (``with provider.stage("graph")``) while the provider times the
    model work it does for them inside; exclusive times add up to the total without counting
    anything twice. A stage entered twice adds up.
    """

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._inner: list[float] = []

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            inner = self._inner.pop()
            self.timings[name] = self.timings.get(name, 0.0) + elapsed - inner
            if self._inner:
                self._inner[-1] += elapsed


def rng_for(seed: int, *salt: int) -> np.random.Generator:
    """The method's random generator: same seed, same draws."""
    return np.random.default_rng([seed, *salt])


ArrayFn = Callable[[np.ndarray], np.ndarray]
