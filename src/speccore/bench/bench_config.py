"""The bench configuration: a YAML file mapped onto dataclasses, with one-line errors.

Selection settings are not duplicated here: the ``select:`` mapping holds
:class:`~speccore.config.SelectConfig` fields (``regions``, ``verify_per_region``,
``small_epochs``, ``score``, ...). The bench itself sets the fields that are the same for
every cell (data, formatting, models, cache) or vary per cell (method, prune rate, seed, and
``token_keep`` for the methods in ``token_methods``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import LoraSettings, SelectConfig, TrainSettings, bench_set_fields, token_fields
from ..utils.errors import ConfigError
from .metrics import MetricSettings

DEFAULT_PRUNE_RATES = [0.2, 0.5, 0.7, 0.8, 0.9]
DEFAULT_SEEDS = [0, 1, 2]
# Token-level selection settings of the ``select:`` mapping. Only cells with token_keep < 1 use
# them, so they are checked per token cell (see ``token_settings``), not bench-wide: setting them
# later keeps the sample-level cells already finished.
TOKEN_SELECT_FIELDS = tuple(f for f in token_fields() if f not in bench_set_fields())
ROW_SAMPLING = ("first", "random")
#: ``selection_seeds``: ``shared``, the selection's own fine-tunes (small model, tuned target,
#: verification LoRA) use one tune seed for every cell seed; ``per_seed``, each cell's seed.
SELECTION_SEEDS = ("shared", "per_seed")


@dataclass
class DataSettings:
    """Training and evaluation data, and how a row becomes a prompt and a response."""

    train: str = ""
    eval: str = ""
    input_field: str | None = None
    output_field: str | None = None
    template: str | None = None
    chat_template: bool = False
    messages_field: str | None = None
    group_field: str | None = None
    # Fields of the evaluation rows holding reference answers (default: [output_field]).
    references: list[str] | None = None
    split: str = "train"
    eval_split: str = "validation"
    train_rows: int | None = None
    eval_rows: int | None = None
    # first: the first N rows; random: N rows drawn with data_seed (kept in file order).
    row_sampling: str = "first"
    data_seed: int = 0
    max_length: int = 512
    truncation_side: str = "left"

    def reference_fields(self) -> list[str]:
        if self.references:
            return list(self.references)
        if self.output_field:
            return [self.output_field]
        raise ConfigError(
            "data.references is required when data.output_field is not set (e.g. [summary])"
        )


@dataclass
class ModelSettings:
    """The small model (selection only) and the target (selection, fine-tuning, evaluation)."""

    target: str = ""
    small: str | None = None
    dtype: str = "auto"
    device: str = "auto"


@dataclass
class GenerationSettings:
    """Greedy decoding on the evaluation prompts."""

    max_new_tokens: int = 128
    batch_size: int = 8
    # Prompt tokens kept (cut on data.truncation_side); default data.max_length − max_new_tokens.
    max_prompt_tokens: int | None = None
    # A row also stops once its text holds one of these strings, and its prediction is cut
    # before it (lm-evaluation-harness's `until`): ["\n"] for one-line answers, so that a
    # model that has not yet learned to stop does not ramble on to max_new_tokens.
    stop: list[str] = field(default_factory=list)


#: Settings that change how fast a cell runs, not what it computes (batched greedy generation
#: gives the rows' one-by-one outputs: tests/test_bench_run.py), so a finished bench resumes
#: under another value.
THROUGHPUT_ONLY: tuple[tuple[str, str], ...] = (("generation", "batch_size"),)


@dataclass
class BenchConfig:
    """Everything ``speccore bench CONFIG.yaml`` takes; see ``quality-bench/*.yaml`` for examples."""

    out: str = ""
    data: DataSettings = field(default_factory=DataSettings)
    models: ModelSettings = field(default_factory=ModelSettings)
    methods: list[str] = field(default_factory=lambda: ["staff", "random"])
    # Named variants of a method, listed in `methods` like a method: another small model or
    # other select settings, e.g. {staff-derived: {method: staff, small: "derive:0.5"}}.
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    prune_rates: list[float] = field(default_factory=lambda: list(DEFAULT_PRUNE_RATES))
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS))
    # Fractions of response tokens kept (token-level selection on top of the coreset); 1.0 is
    # sample-level training. Only the methods in token_methods get values below 1.
    token_keeps: list[float] = field(default_factory=lambda: [1.0])
    token_methods: list[str] = field(default_factory=lambda: ["staff"])
    # Reference rows: fine-tuning on all training rows (per seed), and no fine-tuning (once).
    full: bool = True
    zero_shot: bool = True
    # The target's LoRA fine-tune on each coreset; its ``seed`` is the cell's seed.
    finetune: TrainSettings = field(default_factory=TrainSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    max_batch_tokens: int = 4096
    # SelectConfig fields for the selection (regions, verify_per_region, small_epochs, ...).
    select: dict[str, Any] = field(default_factory=dict)
    # Whether the cell seed also seeds the selection's own fine-tunes (its ``tune_seed``: the
    # small model's LoRA, the tuned target of GraNd/EL2N/CCS/D2, STAFF's verification LoRA):
    # per_seed makes a seed vary what a user's rerun would vary, at one selection fine-tune per
    # seed; shared (the default, as benches ran before the setting) fine-tunes once per method
    # and the verdict holds for that one fine-tune.
    selection_seeds: str = "shared"
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    metrics: MetricSettings = field(default_factory=MetricSettings)
    # One score/adapter cache for every method (a stage computed once serves all methods, so
    # the overhead table shows it only where it was first computed); false: one per method, so
    # each method's overhead is its cold cost.
    share_cache: bool = True

    @property
    def folder(self) -> Path:
        return Path(self.out)

    @property
    def prompt_budget(self) -> int:
        g = self.generation
        if g.max_prompt_tokens is not None:
            return g.max_prompt_tokens
        return max(1, self.data.max_length - g.max_new_tokens)

    def select_config(
        self, method: str, prune_rate: float, seed: int, token_keep: float = 1.0
    ) -> SelectConfig:
        """The SelectConfig of one cell (its cache folder inside the bench folder); ``method``
        may name a variant."""
        cache = self.folder / "cache"
        if not self.share_cache:
            cache = cache / method
        d = self.data
        variant = dict(self.variants.get(method, {}))
        method = variant.pop("method", method)
        small = variant.pop("small", self.models.small)
        settings = {
            **self.select,
            **variant,
            "data": self.train_path(),
            "input_field": d.input_field,
            "output_field": d.output_field,
            "template": d.template,
            "chat_template": d.chat_template,
            "messages_field": d.messages_field,
            "group_field": d.group_field,
            "split": d.split,
            "max_length": d.max_length,
            "truncation_side": d.truncation_side,
            "small": small,
            "target": self.models.target,
            "dtype": self.models.dtype,
            "device": self.models.device,
            "method": method,
            "prune_rate": prune_rate,
            "seed": seed,
            "token_keep": token_keep,
            "cache_dir": str(cache),
        }
        if self.selection_seeds == "per_seed":
            settings["tune_seed"] = seed
        return SelectConfig.from_dict(settings)

    def base_method(self, name: str) -> str:
        """The registered method of a method or variant name."""
        return str(self.variants.get(name, {}).get("method", name))

    def variant_bases(self) -> dict[str, str]:
        """Each variant's name → the method it varies (the bench compares the two)."""
        return {name: self.base_method(name) for name in self.variants}

    def train_path(self) -> str:
        """The data selections run on: a subset file in the bench folder, or the data itself."""
        if self.data.train_rows is None:
            return self.data.train
        return str(self.folder / "data" / "train.jsonl")

    def token_keeps_for(self, method: str) -> list[float]:
        """The token_keep values of ``method``'s cells: ``token_keeps`` for the methods in
        ``token_methods``, sample-level (1.0) only for the others."""
        return list(self.token_keeps) if method in self.token_methods else [1.0]

    def settings_dict(self) -> dict[str, Any]:
        """What every finished cell's result depends on, beyond its (method, rate, seed,
        token_keep).

        Adding methods, variants, rates, seeds or token_keeps, or switching the reference rows,
        keeps finished cells. The token settings of ``select:`` are left out: only token cells
        depend on them, and those are checked against :meth:`token_settings`. A variant's cells
        are known by its name: give a changed variant a new name.
        """
        d = dataclasses.asdict(self)
        for key in (
            "out",
            "methods",
            "variants",
            "prune_rates",
            "seeds",
            "token_keeps",
            "token_methods",
            "full",
            "zero_shot",
        ):
            d.pop(key)
        d["select"] = {k: v for k, v in d["select"].items() if k not in TOKEN_SELECT_FIELDS}
        for group, key in THROUGHPUT_ONLY:
            d[group].pop(key)
        return d

    def token_settings(self) -> dict[str, Any]:
        """The token-level selection settings a token cell (token_keep < 1) depends on, with
        defaults filled in (writing a default out changes nothing)."""
        sel = self.select_config("random", 0.5, 0)
        return {f"select.{k}": getattr(sel, k) for k in TOKEN_SELECT_FIELDS}

    def validate(self) -> None:
        """Check ranges and names; raise :class:`ConfigError` naming the key and the fix."""
        _validate_top(self)
        _validate_data(self.data)
        if not self.models.target:
            raise ConfigError("models.target is required (alias, folder, .gguf or hub name)")
        from ..selection.base import method_class

        for m in self.methods:
            base = self.base_method(m)
            needs_small = "small" in method_class(base).needs and "scores" not in self.select
            if needs_small and not (self.variants.get(m, {}).get("small") or self.models.small):
                raise ConfigError(f"models.small is required for method {m} (e.g. smollm2-135m)")
        _validate_tokens(self)
        g = self.generation
        if g.max_new_tokens < 1 or g.batch_size < 1:
            raise ConfigError("generation.max_new_tokens and generation.batch_size must be >= 1")
        if not all(isinstance(x, str) and x for x in g.stop):
            raise ConfigError(f"generation.stop takes non-empty strings, got {g.stop!r}")
        if self.finetune.seed != TrainSettings.seed:
            raise ConfigError("finetune.seed is not used: each cell's seed comes from `seeds`")
        if self.selection_seeds not in SELECTION_SEEDS:
            raise ConfigError(
                f"selection_seeds must be shared or per_seed, got {self.selection_seeds!r}"
            )
        if self.selection_seeds == "per_seed" and "tune_seed" in self.select:
            raise ConfigError(
                "select.tune_seed is set by the bench from seeds when selection_seeds is "
                "per_seed; remove it"
            )
        self.metrics.validate()
        self.select_config("random", 0.5, 0).validate()
        for name in self.variants:
            self.select_config(name, 0.5, 0).validate()


def check_bench_folder(cfg: BenchConfig) -> None:
    """Before a bench writes anything: its folder is new, empty or a bench's (never a folder
    of the user's own files), and writable; every model name resolves (a misspelt alias, a
    missing folder, an offline hub name fail now, not in the first cell)."""
    from ..models.load import check_model_name
    from ..utils.runfolder import check_out_folder

    check_out_folder(cfg.folder, "bench", flag="out", replaces=False)
    smalls = [v.get("small") for v in cfg.variants.values()]
    names = {str(n) for n in (cfg.models.target, cfg.models.small, *smalls) if n}
    for name in sorted(names):
        if not name.startswith("derive:"):
            check_model_name(name)


def _validate_top(cfg: BenchConfig) -> None:
    if not cfg.out:
        raise ConfigError("out is required: the bench folder for results, tables and plots")
    from ..selection import method_names

    valid = method_names()
    for name, variant in cfg.variants.items():
        if name in valid:
            raise ConfigError(f"variants: {name!r} is a method's name; give the variant its own")
        if not isinstance(variant, dict) or variant.get("method") not in valid:
            raise ConfigError(
                f"variants.{name}: needs `method:` one of {', '.join(valid)} (and e.g. small:)"
            )
        bench_set = set(bench_set_fields()) - {"small", "method"}
        for key in set(variant) & bench_set:
            raise ConfigError(f"variants.{name}.{key} is set by the bench; remove it")
    for m in cfg.methods:
        if m not in valid and m not in cfg.variants:
            raise ConfigError(
                f"methods: unknown method {m!r}; valid: {', '.join(valid)} or a variant name"
            )
    if len(set(cfg.methods)) != len(cfg.methods):
        raise ConfigError(f"methods lists a method twice: {cfg.methods}")
    for p in cfg.prune_rates:
        if not 0 < p < 1:
            raise ConfigError(f"prune_rates must be in (0, 1) (p = 0 is the `full` row), got {p}")
    if not cfg.seeds:
        raise ConfigError("seeds must list at least one seed, e.g. [0, 1, 2]")
    if len(set(cfg.seeds)) != len(cfg.seeds) or len(set(cfg.prune_rates)) != len(cfg.prune_rates):
        raise ConfigError("seeds and prune_rates must not repeat a value")
    if cfg.max_batch_tokens < 1:
        raise ConfigError(f"max_batch_tokens must be >= 1, got {cfg.max_batch_tokens}")
    for key, where in bench_set_fields().items():
        if key in cfg.select:
            raise ConfigError(f"select.{key} is set by the bench from {where}; remove it")


def _validate_tokens(cfg: BenchConfig) -> None:
    """``token_keeps`` and ``token_methods``: values, names, and the small model they need."""
    if not cfg.token_keeps:
        raise ConfigError("token_keeps must list at least one value, e.g. [1.0, 0.6]")
    for k in cfg.token_keeps:
        if not 0 < k <= 1:
            raise ConfigError(f"token_keeps must be in (0, 1] (1.0: all tokens), got {k}")
    if len(set(cfg.token_keeps)) != len(cfg.token_keeps):
        raise ConfigError(f"token_keeps must not repeat a value: {cfg.token_keeps}")
    from ..selection import method_names

    valid = method_names()  # the registry is complete: _validate_top imported the methods
    for m in cfg.token_methods:
        if m not in valid:
            raise ConfigError(f"token_methods: unknown method {m!r}; valid: {', '.join(valid)}")
    if all(k == 1 for k in cfg.token_keeps):
        return
    used = [m for m in cfg.token_methods if m in cfg.methods]
    if not used:
        raise ConfigError(
            f"token_keeps has values below 1 but no method of token_methods {cfg.token_methods} "
            f"is in methods {cfg.methods}; add one to methods or drop the values below 1"
        )
    if not cfg.models.small:
        raise ConfigError(
            "models.small is required for token_keeps below 1: it scores the tokens "
            "(e.g. smollm2-135m)"
        )


def _validate_data(d: DataSettings) -> None:
    if not d.train:
        raise ConfigError("data.train is required: the training data (file, folder or hub name)")
    if not d.eval:
        raise ConfigError("data.eval is required: held-out evaluation data with reference fields")
    if d.row_sampling not in ROW_SAMPLING:
        raise ConfigError(f"data.row_sampling must be first or random, got {d.row_sampling!r}")
    for key in ("train_rows", "eval_rows"):
        value = getattr(d, key)
        if value is not None and value < 1:
            raise ConfigError(f"data.{key} must be >= 1 (or left out for all rows), got {value}")
    d.reference_fields()


# ---------------------------------------------------------------------------------------------
# YAML → dataclasses
# ---------------------------------------------------------------------------------------------


def load_bench_config(path: str | Path, **overrides: Any) -> BenchConfig:
    """Read a bench YAML file; unknown keys and wrong types raise :class:`ConfigError`.

    ``overrides`` replace top-level keys (e.g. ``out=...``).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"bench config {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"bench config {path}: not valid YAML ({_one_line(e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"bench config {path}: expected a mapping of settings at the top")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = bench_config_from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"bench config {path}: {e}") from None
    return cfg


def bench_config_from_dict(raw: dict[str, Any]) -> BenchConfig:
    """Build and validate a :class:`BenchConfig` from a plain mapping (parsed YAML)."""
    cfg = _build(BenchConfig, raw, "")
    assert isinstance(cfg, BenchConfig)
    cfg.validate()
    return cfg


def _build(cls: type, raw: Any, where: str) -> Any:
    """Instantiate dataclass ``cls`` from mapping ``raw``, checking keys and value types."""
    label = where.rstrip(".") or "the top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{label} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown key {where}{unknown[0]}; valid keys in {label}: {', '.join(names)}"
        )
    values = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, value, f"{where}{name}.")  # type: ignore[arg-type]
        else:
            values[name] = _coerce(value, tp, f"{where}{name}")
    return cls(**values)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against type hint ``tp`` (ints accepted for floats)."""
    origin = typing.get_origin(tp)
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        if not isinstance(value, list):
            value = [value]  # `seeds: 0` means [0]
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {_kind(value)}")
        return dict(value)
    return _scalar(value, tp, key)


def _scalar(value: Any, tp: Any, key: str) -> Any:
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)  # YAML reads `language: no` as False but `split: 2023` as an int
    if tp is Any:
        return value
    raise ConfigError(f"{key} must be {tp.__name__}, got {_kind(value)}")


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
