"""The contract every selection method follows, and the method registry.

A method is one module. It subclasses :class:`SelectionMethod` and registers (with
:func:`register_method`) its name, a one-line description, its own settings dataclass (a
:class:`MethodSettings`, whose field names are the flag names: ``d2_k`` ↔ ``--d2-k``), the models
it needs and the model work it asks for (:meth:`SelectionMethod.requests`, a list of
:class:`ModelWork`; its dry-run plan is derived from them). The module is named in the
``speccore.methods`` entry points. The configuration, the CLI flags, YAML files, the bench and
the dry run all read the registry, so a new method touches nothing else.

A method receives a :class:`ScoreProvider`, which serves its :class:`ModelWork` through the
cache (a test passes plain arrays instead), a budget ``m`` and a seed, and returns a
:class:`Selection`. Methods never load models themselves: that keeps each one a short, testable
transcription of its paper.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import time
import typing
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import numpy as np

from ..utils.errors import ConfigError
from ..utils.io import write_json

if TYPE_CHECKING:
    import datasets


class RunConfig(Protocol):
    """The part of :class:`~speccore.config.SelectConfig` a method reads (settings every method
    shares, and its own settings through :meth:`settings_for`)."""

    method: str
    prune_rate: float
    small_epochs: float
    target_epochs: float
    scores: str | None
    small_adapter: str | None

    def settings_for(self, method: str) -> Any:
        """The validated settings dataclass of ``method``."""
        ...


@dataclass(frozen=True)
class ModelWork:
    """One kind of model work a method asks for, as lm-evaluation-harness's tasks ask for
    ``loglikelihood`` or ``generate_until``: which model, which adapter state, which output.

    ``output`` is a registered output (:mod:`speccore.scoring.outputs`: "effort", "loss",
    "el2n", "embedding", ...). ``tuned``: after the model's LoRA fine-tune on all rows
    (``--small-epochs`` / ``--target-epochs``; a ``--small-adapter`` is the small model's tuned
    state), else the pretrained model (a fresh LoRA, B = 0). ``some_rows``: the method names the
    rows per call (STAFF's verification), and ``planned_rows`` says how many it will ask for in
    all (for the dry run). ``checkpoints`` > 1: the output at that many evenly spaced points of
    the fine-tune, its untuned start and its end included, one column each (S2L's loss
    trajectories). ``stage`` names the stage its time is reported under.
    """

    model: Literal["small", "target"]
    output: str
    tuned: bool = False
    some_rows: bool = False
    checkpoints: int = 1
    stage: str = ""
    planned_rows: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.stage:
            object.__setattr__(self, "stage", f"{self.model} scoring")
        if self.checkpoints > 1 and not (self.tuned and not self.some_rows):
            raise ValueError("checkpoints > 1 needs tuned=True on all rows")


class ScoreProvider(Protocol):
    """What a method may ask of the models: its declared :class:`ModelWork`, served and cached
    (asking twice costs nothing). A test passes plain arrays instead."""

    n: int

    @property
    def config(self) -> RunConfig:
        """The run's settings."""
        ...

    def get(self, work: ModelWork, rows: np.ndarray | None = None) -> np.ndarray:
        """``work``'s output: ``[N]`` scores, ``[N, D]`` vectors or ``[N, C]`` checkpoints, or
        for ``some_rows`` work the rows at ``rows`` (same order)."""
        ...

    def fine_tune_steps(self, model: str) -> int:
        """Optimizer steps of ``model``'s fine-tune on all rows (where ``checkpoints`` lie)."""
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


Score = Literal["effort", "loss", "el2n"]
"""A per-sample score: LoRA gradient norm, mean response loss, or EL2N."""


@dataclass
class MethodSettings:
    """Base of a method's own settings. Field names are flag names (``d2_k`` ↔ ``--d2-k``); a
    field shared by several methods (``regions``) is declared identically in each (checked at
    registration). ``Literal`` fields are checked by the parser and by :meth:`validate`."""

    def validate(self) -> None:
        """Check ranges; raise :class:`ConfigError` naming the flag. Literals are checked."""
        check_literals(self)


@dataclass
class NoSettings(MethodSettings):
    """A method without settings of its own."""


@dataclass(frozen=True)
class Work:
    """One stage of model work a method will do (its dry-run plan is a list of these)."""

    stage: str
    role: Literal["small", "target"]
    kind: str  # "train" or a registered output
    epochs: float = 0.0
    samples: int | None = None  # None: every sample; else a count (target verification)


class SelectionMethod(ABC):
    """One coreset method. Subclasses set the class attributes and implement :meth:`select`
    and :meth:`requests`, then register with :func:`register_method`."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    settings_class: ClassVar[type[MethodSettings]] = NoSettings
    # The models a method loads ("small", "target"): checked before any work starts.
    needs: ClassVar[tuple[str, ...]] = ()
    # Whether the coreset depends on the seed (random draws), as the contract test checks.
    random_draws: ClassVar[bool] = False
    # Bump when a change to the method's code changes its coresets: bench cells made by an
    # older version are re-run (speccore.bench.versions).
    version: ClassVar[int] = 1

    def settings(self, config: RunConfig) -> Any:
        """This method's settings out of ``config``."""
        return config.settings_for(self.name)

    @abstractmethod
    def select(self, provider: ScoreProvider, budget: int, seed: int) -> Selection:
        """Pick ``budget`` samples (or fewer, where the method allows) out of ``provider.n``."""

    @abstractmethod
    def requests(self, config: RunConfig, n: int) -> list[ModelWork]:
        """Every :class:`ModelWork` :meth:`select` asks for under ``config``, no more, no less
        (the contract test runs :meth:`select` on a recording provider and compares)."""

    def plan(self, config: RunConfig, n: int) -> list[Work]:
        """The model work :meth:`select` will do on ``n`` samples, stage by stage (what the dry
        run times), derived from :meth:`requests`: each model's fine-tune once, before the first
        request of its tuned state, then each request."""
        return plan_of(self.requests(config, n), config, n)


def plan_of(requests: list[ModelWork], config: RunConfig, n: int) -> list[Work]:
    """Stages of model work for ``requests`` (see :meth:`SelectionMethod.plan`)."""
    work: list[Work] = []
    tuned: set[str] = set()
    for r in requests:
        if r.tuned and r.model not in tuned:
            tuned.add(r.model)
            epochs = config.small_epochs if r.model == "small" else config.target_epochs
            user_adapter = r.model == "small" and bool(config.small_adapter)
            if epochs > 0 and not user_adapter:
                work.append(Work(f"{r.model} fine-tune", r.model, "train", epochs=epochs))
        rows = r.planned_rows if r.some_rows else None
        if r.checkpoints > 1:  # one pass over the data per checkpoint
            rows = r.checkpoints * n
        work.append(Work(r.stage, r.model, r.output, samples=rows))
    return work


_REGISTRY: dict[str, type[SelectionMethod]] = {}
_SETTING_FIELDS: dict[str, tuple[dataclasses.Field[Any], Any, str]] = {}

#: Methods are modules named in this entry-point group (speccore's own in its pyproject.toml),
#: so another package adds one without editing speccore.
ENTRY_POINT_GROUP = "speccore.methods"
_loaded = False


def load_methods() -> None:
    """Import every module of the ``speccore.methods`` entry points, once; their
    ``@register_method`` classes fill the registry. A module that fails to import is an error
    naming its entry point, never a silently missing method."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # before importing: a method module may itself ask for the registry
    points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    if not any(p.value.startswith("speccore.") for p in points):
        _loaded = False
        raise ConfigError(
            f"no built-in selection methods in the {ENTRY_POINT_GROUP!r} entry points: speccore "
            "is not installed as a package; install it (pip install -e .)"
        )
    for point in sorted(points, key=lambda p: p.name):
        try:
            point.load()
        except Exception as err:
            raise ConfigError(
                f"selection method {point.name!r} (entry point {point.value!r} in group "
                f"{ENTRY_POINT_GROUP!r}) failed to load: {type(err).__name__}: {err}"
            ) from err


def register_method(cls: type[SelectionMethod]) -> type[SelectionMethod]:
    """Class decorator: make a method available by its ``name``.

    Checks what a method must declare, as ``peft``'s ``register_peft_method`` and
    lm-evaluation-harness's registry do: a :class:`SelectionMethod` subclass with a unique name,
    a description, a :class:`MethodSettings` dataclass whose fields agree with every other
    method's fields of the same name.
    """
    if not (isinstance(cls, type) and issubclass(cls, SelectionMethod)):
        raise TypeError(f"{cls!r} is not a SelectionMethod subclass")
    name = getattr(cls, "name", "")
    if not name or not isinstance(name, str):
        raise TypeError(f"{cls.__name__} has no name")
    if name in _REGISTRY:
        raise ValueError(f"selection method {name!r} registered twice")
    if not cls.description:
        raise TypeError(f"selection method {name!r} has no description")
    settings = cls.settings_class
    if not (dataclasses.is_dataclass(settings) and issubclass(settings, MethodSettings)):
        raise TypeError(f"{name}: settings_class must be a MethodSettings dataclass")
    hints = typing.get_type_hints(settings)
    for f in dataclasses.fields(settings):  # check every field before recording any
        known = _SETTING_FIELDS.get(f.name)
        if known is not None and (known[1], _default(known[0])) != (hints[f.name], _default(f)):
            raise TypeError(
                f"{name}: setting {f.name!r} differs from method {known[2]!r}'s declaration"
            )
    for f in dataclasses.fields(settings):
        _SETTING_FIELDS.setdefault(f.name, (f, hints[f.name], name))
    _REGISTRY[name] = cls
    return cls


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def method_names() -> list[str]:
    load_methods()
    return sorted(_REGISTRY)


def method_class(name: str) -> type[SelectionMethod]:
    """The class registered as ``name``; an unknown name lists the valid ones."""
    load_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, method_names(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(
            f"unknown selection method {name!r}{hint}; valid methods: {', '.join(method_names())}"
        ) from None


def get_method(name: str) -> SelectionMethod:
    """An instance of the method called ``name``; an unknown name lists the valid ones."""
    return method_class(name)()


def setting_fields() -> dict[str, tuple[dataclasses.Field[Any], Any]]:
    """Every method setting: flat name → (dataclass field, resolved type)."""
    load_methods()
    return {k: (f, tp) for k, (f, tp, _) in _SETTING_FIELDS.items()}


def methods_using(setting: str) -> list[str]:
    """The methods whose settings hold the field ``setting``."""
    load_methods()
    return [
        n
        for n, cls in sorted(_REGISTRY.items())
        if setting in {f.name for f in dataclasses.fields(cls.settings_class)}
    ]


def check_literals(obj: Any) -> None:
    """Every ``Literal`` field of dataclass ``obj`` holds one of its values."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        tp = hints[f.name]
        args = typing.get_args(tp)
        if typing.get_origin(tp) is not Literal:
            # Optional[Literal[...]]: check the Literal inside.
            lits = [a for a in args if typing.get_origin(a) is Literal]
            if not lits or getattr(obj, f.name) is None:
                continue
            args = typing.get_args(lits[0])
        value = getattr(obj, f.name)
        if value not in args:
            flag = "--" + f.name.replace("_", "-")
            choices = ", ".join(str(a) for a in args)
            raise ConfigError(f"{flag} must be one of {choices}, got {value!r}")


class StageTimer:
    """Wall time per named stage, *exclusive* of the stages nested in it.

    Methods time their own work (``with provider.stage("graph")``) while the provider times the
    model work it does for them inside; exclusive times add up to the total without counting
    anything twice. A stage entered twice adds up.
    """

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._inner: list[float] = []
        self.tokens: dict[str, list[int]] = {}  # stage -> [real tokens, padded tokens]

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

    def count(self, name: str, tokens: float, padded: float) -> None:
        """Add the model work of stage ``name``: real and padded tokens through the model."""
        held = self.tokens.setdefault(name, [0, 0])
        held[0] += int(tokens)
        held[1] += int(padded)

    def throughput(self) -> dict[str, dict[str, float]]:
        """Per counted stage: ``tokens``, ``padding_tokens`` (padded minus real),
        ``padding_fraction`` (of the padded tokens) and ``tokens_per_s`` (real tokens over the
        stage's exclusive time)."""
        out = {}
        for name, (real, padded) in self.tokens.items():
            seconds = self.timings.get(name, 0.0)
            out[name] = {
                "tokens": real,
                "padding_tokens": padded - real,
                "padding_fraction": round((padded - real) / padded, 4) if padded else 0.0,
                "tokens_per_s": round(real / seconds, 1) if seconds > 0 else 0.0,
            }
        return out


def rng_for(seed: int, *salt: str | int) -> np.random.Generator:
    """The one way a method draws at random: ``rng_for(seed, "ccs")``, salted with the name of
    the draw (a string, hashed with CRC-32; ints pass as they are), so two draws of one run never
    share a stream and the same seed gives the same draws."""
    words = [zlib.crc32(s.encode()) if isinstance(s, str) else int(s) for s in salt]
    return np.random.default_rng([seed, *words])


ArrayFn = Callable[[np.ndarray], np.ndarray]
