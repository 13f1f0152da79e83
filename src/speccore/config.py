"""Configuration dataclasses, and the one parser that fills them from flags, YAML files and dicts.

:class:`SelectConfig` holds what every method shares (data, formatting, models, LoRA, training,
run settings); each method's own settings are a dataclass registered with the method (see
:mod:`speccore.selection.base`) and live in ``SelectConfig.method_options``. The flags are the
flat field names (``prune_rate`` ↔ ``--prune-rate``; the LoRA group's ``r`` ↔ ``--lora-r``;
a method's ``d2_k`` ↔ ``--d2-k``), and a YAML file or a dict uses the same names
(``prune_rate: 0.9``). Flags, files and dicts all go through one
:class:`transformers.HfArgumentParser`, so they are typed, checked and refused alike.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any, Literal

from .selection.base import check_literals, method_class, method_names, setting_fields
from .utils.errors import ConfigError

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Engine = Literal["local", "ray"]
Side = Literal["left", "right"]
TokenScorer = Literal["small", "target"]
TokenRank = Literal["sample", "global"]
LoadIn = Literal["8bit", "4bit"]
Batching = Literal["tokens", "rows"]
TOKEN_RANKS = typing.get_args(TokenRank)


@dataclass
class LoraSettings:
    """LoRA adapter settings (peft), shared by every model speccore tunes or scores."""

    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (training only)"})
    # None: every attention and MLP projection the architecture has.
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "comma-separated module names (default: every projection)"},
    )

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"--lora-r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"--lora-alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TrainSettings:
    """LoRA fine-tuning: AdamW, linear warm-up then cosine decay."""

    epochs: float = 3.0
    learning_rate: float = field(default=2e-4, metadata={"help": "fine-tune learning rate"})
    batch_size: int = field(
        default=8,
        metadata={"help": "fine-tune batch size in rows (--batching rows; sizes the token budget)"},
    )
    batching: Batching = field(
        default="tokens",
        metadata={
            "help": "fine-tune batches: tokens (rows of similar length filling --batch-tokens) "
            "or rows (--batch-size rows in random order)"
        },
    )
    batch_tokens: int = field(
        default=0,
        metadata={
            "help": "padded tokens per fine-tune batch (0: --batch-size rows of the mean length, "
            "as many steps as row batching; raise it on a GPU)"
        },
    )
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "warm-up share of the steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    seed: int = 0

    def validate(self) -> None:
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.grad_accum < 1:
            raise ConfigError(f"--grad-accum must be >= 1, got {self.grad_accum}")
        if self.batching not in ("tokens", "rows"):
            raise ConfigError(f"--batching must be tokens or rows, got {self.batching!r}")
        if self.batch_tokens < 0:
            raise ConfigError(f"--batch-tokens must be >= 0 (0: auto), got {self.batch_tokens}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")


# Nested groups of SelectConfig: (field name, flag prefix, fields that are not flags).
GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "lora": ("lora_", ()),
    "train": ("", ("epochs", "seed")),
}


def _help(text: str, **more: Any) -> dict[str, Any]:
    return {"help": text, **more}


@dataclass
class SelectConfig:
    """Everything ``speccore select`` takes. Field ``foo_bar`` is flag ``--foo-bar``.

    ``metadata["bench"]`` names where a bench sets the field itself; ``metadata["token"]``
    marks token-level selection settings (only token cells of a bench depend on them).
    """

    data: str = field(
        default="",
        metadata=_help("training data: file, saved dataset or hub name", bench="data.train"),
    )
    input_field: str | None = field(
        default=None, metadata=_help("prompt field", bench="data.input_field")
    )
    output_field: str | None = field(
        default=None, metadata=_help("response field", bench="data.output_field")
    )
    template: str | None = field(
        default=None,
        metadata=_help("prompt template with {field} placeholders", bench="data.template"),
    )
    chat_template: bool = field(
        default=False,
        metadata=_help(
            "format prompts with the tokenizer's chat template", bench="data.chat_template"
        ),
    )
    messages_field: str | None = field(
        default=None,
        metadata=_help(
            "field holding a list of {role, content} turns", bench="data.messages_field"
        ),
    )
    group_field: str | None = field(
        default=None,
        metadata=_help("field to report kept fractions by (e.g. topic)", bench="data.group_field"),
    )
    split: str = field(
        default="train", metadata=_help("split of a hub or saved dataset", bench="data.split")
    )
    small: str | None = field(
        default=None,
        metadata=_help(
            "small model: hub name, folder, .gguf, alias, or derive:FRACTION (layers of the "
            "target)",
            bench="models.small",
        ),
    )
    target: str | None = field(default=None, metadata=_help("target model", bench="models.target"))
    method: str = field(default="staff", metadata=_help("selection method", bench="methods"))
    prune_rate: float = field(
        default=0.9, metadata=_help("fraction of samples to drop, [0, 1)", bench="prune_rates")
    )
    small_epochs: float = field(default=3.0, metadata=_help("T, small-model fine-tune epochs"))
    target_epochs: float = field(
        default=3.0, metadata=_help("target fine-tune epochs (GraNd, EL2N, CCS, D2)")
    )
    seed: int = field(
        default=0, metadata=_help("seed of the selection's random draws", bench="seeds")
    )
    tune_seed: int = field(
        default=0,
        metadata=_help(
            "seed of LoRA init and fine-tune shuffles (apart from --seed, so that a new "
            "selection seed reuses cached adapters and scores)"
        ),
    )
    max_length: int = field(
        default=512,
        metadata=_help("max tokens; truncates the prompt", bench="data.max_length"),
    )
    truncation_side: Side = field(
        default="left",
        metadata=_help("which end of the prompt to cut", bench="data.truncation_side"),
    )
    dedupe: bool = field(
        default=False,
        metadata=_help(
            "select among the first occurrence of each repeated row only (rows equal in "
            "every field); the coreset's indices stay those of --data"
        ),
    )
    small_adapter: str | None = field(
        default=None, metadata=_help("use this LoRA adapter instead of tuning the small model")
    )
    scores: str | None = field(
        default=None, metadata=_help("precomputed speculative scores (.npy, .npz or .json)")
    )
    out: str | None = field(default=None, metadata=_help("run folder for the outputs", bench="out"))
    overwrite: bool = field(
        default=False,
        metadata=_help("replace the run already in --out", bench="(the bench owns its folders)"),
    )
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    # 0 (auto): sized from the free memory of a CUDA device (a power of two), else 1024, which
    # keeps a 262k-vocabulary target (Gemma) under ~7 GB on a CPU box.
    max_batch_tokens: int = field(
        default=0,
        metadata=_help(
            "padded tokens per forward (scoring and fine-tune micro-batches); 0: auto, from "
            "free GPU memory, 1024 on a CPU"
        ),
    )
    dtype: Dtype = field(default="auto", metadata=_help("model dtype", bench="models.dtype"))
    device: str = field(
        default="auto", metadata=_help("auto | cpu | cuda | cuda:N", bench="models.device")
    )
    device_map: str | None = field(
        default=None,
        metadata=_help("'auto': spread a target too large for one device over all of them"),
    )
    load_in: LoadIn | None = field(
        default=None,
        metadata=_help("quantised base weights through bitsandbytes (QLoRA-style), CUDA only"),
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata=_help("recompute activations in fine-tunes and effort scoring (less memory)"),
    )
    compile: bool = field(
        default=False,
        metadata=_help(
            "torch.compile the models' forward for fine-tunes and loss scoring (effort runs "
            "eager: its taps cannot be compiled)"
        ),
    )
    engine: Engine = field(default="local", metadata=_help("scoring engine"))
    dry_run: bool = field(
        default=False,
        metadata=_help(
            "score a few batches, print estimates, exit", bench="(not available in a bench)"
        ),
    )
    cache_dir: str | None = field(
        default=None,
        metadata=_help(
            "cache folder (default $SPECCORE_CACHE)",
            bench="share_cache (the bench keeps its cache in its folder)",
        ),
    )
    no_cache: bool = field(
        default=False, metadata=_help("neither read nor write cached adapters and scores")
    )
    checkpoint_seconds: float = field(
        default=30.0, metadata=_help("save scoring and fine-tune progress at least this often")
    )
    token_keep: float = field(
        default=1.0,
        metadata=_help(
            "fraction of response tokens to keep, (0, 1]; 1.0 = sample-level only",
            bench="token_keeps (per cell, for the methods in token_methods)",
            token=True,
        ),
    )
    token_scorer: TokenScorer = field(
        default="small",
        metadata=_help(
            "the base loss comes from the untuned small model or the untuned target", token=True
        ),
    )
    token_crossfit: bool = field(
        default=True,
        metadata=_help(
            "--no-token-crossfit reuses the STAFF adapter (scores its own training rows)",
            token=True,
        ),
    )
    token_rank: TokenRank = field(
        default="sample", metadata=_help("rank tokens per sample or globally", token=True)
    )
    # Settings of the methods (flat name → value, e.g. {"regions": 10, "d2_k": 5}); each method
    # reads its own through :meth:`settings_for`. Unset settings take the method's defaults.
    method_options: dict[str, Any] = field(default_factory=dict)

    # --- derived views -------------------------------------------------------------------

    def train_settings(self, epochs: float) -> TrainSettings:
        """The fine-tune settings of a stage that runs ``epochs`` epochs (seed: tune_seed)."""
        return dataclasses.replace(self.train, epochs=epochs, seed=self.tune_seed)

    def settings_for(self, method: str) -> Any:
        """The validated settings dataclass of ``method`` (its defaults, then method_options)."""
        cls = method_class(method).settings_class
        names = {f.name for f in fields(cls)}
        settings = cls(**{k: v for k, v in self.method_options.items() if k in names})
        settings.validate()
        return settings

    @property
    def method_settings(self) -> Any:
        """The settings of :attr:`method`."""
        return self.settings_for(self.method)

    # --- checks --------------------------------------------------------------------------

    def validate(self) -> None:
        """Check names and ranges without touching any file or model; raise
        :class:`ConfigError` naming the argument."""
        if not self.data:
            raise ConfigError("--data is required: a JSONL/CSV/Parquet file, folder or hub name")
        method_class(self.method)  # unknown names list the valid ones
        unknown = sorted(set(self.method_options) - set(setting_fields()))
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r}; {_valid_names_hint(unknown[0])}")
        if not 0 <= self.prune_rate < 1:
            raise ConfigError(f"--prune-rate must be in [0, 1), got {self.prune_rate}")
        check_literals(self)
        if self.max_length < 3:
            raise ConfigError(f"--max-length must be >= 3, got {self.max_length}")
        for flag, epochs in (
            ("--small-epochs", self.small_epochs),
            ("--target-epochs", self.target_epochs),
        ):
            if not epochs > 0:
                # 0 epochs would score with a fresh LoRA adapter, silently untuned.
                raise ConfigError(
                    f"{flag} must be > 0, got {epochs}; for scores of an untuned model use "
                    "--method perplexity --perplexity-model untuned or staff-target-only"
                )
        if self.max_batch_tokens < 0:
            raise ConfigError(
                f"--max-batch-tokens must be >= 1, or 0 for auto, got {self.max_batch_tokens}"
            )
        if self.checkpoint_seconds <= 0:
            raise ConfigError(f"--checkpoint-seconds must be > 0, got {self.checkpoint_seconds}")
        if self.device_map not in (None, "auto"):
            raise ConfigError(f"--device-map must be auto (or left out), got {self.device_map!r}")
        self.lora.validate()
        self.train.validate()
        if not 0 < self.token_keep <= 1:
            raise ConfigError(f"--token-keep must be in (0, 1], got {self.token_keep}")
        if self.dedupe and self.token_keep < 1:
            # Token masks are saved by row of the data selected from, not of the file.
            raise ConfigError(
                "--dedupe with --token-keep below 1 is not supported: remove the repeated "
                "rows from the file instead"
            )
        self.method_settings.validate()
        # Settings given for other methods are checked too: a typo'd value fails now.
        for name in method_names():
            cls = method_class(name).settings_class
            if {f.name for f in fields(cls)} & set(self.method_options):
                self.settings_for(name)

    # --- dicts ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Flat settings (the flag names) with the method's effective settings; a dict
        :meth:`from_dict` turns back into the same config."""
        d = {k: v for k, v in asdict(self).items() if k not in GROUPS and k != "method_options"}
        for group, (prefix, hidden) in GROUPS.items():
            for k, v in asdict(getattr(self, group)).items():
                if k not in hidden:
                    d[prefix + k] = v
        d.update(self.method_options)
        d.update(asdict(self.method_settings))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str | None = None) -> SelectConfig:
        """A config from flat settings (flag names with underscores), checked by the parser
        that reads the flags; unknown names and wrong types raise :class:`ConfigError`."""
        return parse_select_args(dict_to_args(d, source=source), source=source)


# ---------------------------------------------------------------------------------------------
# One parser for flags, YAML files and dicts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    """One flag: its flat name, where its value goes, and its (resolved) type."""

    name: str
    group: str | None  # "lora" | "train" | None (top level) | "method" (a method setting)
    attr: str  # the field's name inside its group
    field: dataclasses.Field[Any]
    type: Any


@cache
def _shared_flags() -> tuple[Flag, ...]:
    hints = typing.get_type_hints(SelectConfig)
    out: list[Flag] = []
    for f in fields(SelectConfig):
        if f.name == "method_options":
            continue
        if f.name in GROUPS:
            prefix, hidden = GROUPS[f.name]
            group_cls = hints[f.name]
            group_hints = typing.get_type_hints(group_cls)
            for g in fields(group_cls):
                if g.name not in hidden:
                    out.append(Flag(prefix + g.name, f.name, g.name, g, group_hints[g.name]))
        else:
            out.append(Flag(f.name, None, f.name, f, hints[f.name]))
    return tuple(out)


def select_flags() -> list[Flag]:
    """Every flag of ``speccore select``: shared settings, then every method's settings."""
    flags = list(_shared_flags())
    shared = {f.name for f in flags}
    for name, (f, tp) in sorted(setting_fields().items()):
        if name in shared:
            raise TypeError(f"method setting {name!r} shadows a shared setting")
        flags.append(Flag(name, "method", name, f, tp))
    return flags


def _flag_type(tp: Any) -> Any:
    """Lists are comma-separated strings on the command line (``--lora-target-modules q,v``)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list or any(typing.get_origin(a) is list for a in args):
        return str | None
    return tp


def default_of(f: dataclasses.Field[Any]) -> Any:
    """A dataclass field's default (calling its factory)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def arguments_class() -> type:
    """A flat dataclass of every flag, for :class:`transformers.HfArgumentParser`."""
    specs = []
    for flag in select_flags():
        meta: dict[str, Any] = {"help": flag.field.metadata.get("help", "")}
        if flag.name == "method":
            meta["choices"] = method_names()
            meta["help"] += " (see `speccore methods`)"
        if flag.group == "method":
            users = ", ".join(_methods_using(flag.name))
            meta["help"] = f"[{users}] {meta['help']}"
        default = default_of(flag.field)
        if isinstance(default, list):
            default = ",".join(default)
        specs.append((flag.name, _flag_type(flag.type), field(default=default, metadata=meta)))
    return dataclasses.make_dataclass("SelectArguments", specs)


def _methods_using(name: str) -> list[str]:
    from .selection.base import methods_using

    return methods_using(name)


def select_parser(**kwargs: Any) -> Any:
    """The ``speccore select`` parser (an :class:`~transformers.HfArgumentParser` whose errors
    are :class:`ConfigError`)."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message: str) -> typing.NoReturn:  # argparse would exit(2)
            raise ConfigError(message)

    return Parser(typing.cast(Any, arguments_class()), **kwargs)


def parse_select_args(
    argv: list[str], *, config_file: str | None = None, source: str | None = None
) -> SelectConfig:
    """Flags (and, before them, a YAML ``config_file``: flags win) → :class:`SelectConfig`."""
    if config_file:
        from_file = yaml_to_args(config_file)
        # The file's values alone first: a wrong type in it names the file.
        parse_select_args(from_file, source=f"--config {config_file}")
        argv = from_file + list(argv)
    try:
        (args,) = select_parser().parse_args_into_dataclasses(args=argv)
    except ConfigError as err:
        where = f"{source}: " if source else ""
        raise ConfigError(f"{where}{err}") from None
    return _from_flat(vars(args))


def _from_flat(values: dict[str, Any]) -> SelectConfig:
    top: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
    options: dict[str, Any] = {}
    for flag in select_flags():
        value = values[flag.name]
        if flag.type is not _flag_type(flag.type) and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] or None
        if flag.group is None:
            top[flag.attr] = value
        elif flag.group == "method":
            if value != default_of(flag.field):
                options[flag.attr] = value
        else:
            groups[flag.group][flag.attr] = value
    hints = typing.get_type_hints(SelectConfig)
    built = {g: hints[g](**v) for g, v in groups.items()}
    return SelectConfig(**top, **built, method_options=options)


def dict_to_args(d: dict[str, Any], *, source: str | None = None) -> list[str]:
    """Flat settings as ``--name=value`` tokens, so that a dict goes through the flag parser."""
    flags = {f.name: f for f in select_flags()}
    out: list[str] = []
    for key, value in d.items():
        flag = flags.get(key)
        if flag is None:
            where = f"{source}: " if source else ""
            raise ConfigError(f"{where}unknown setting {key!r}; {_valid_names_hint(key)}")
        if value is None:
            if default_of(flag.field) is not None:
                raise ConfigError(f"{key} cannot be null (default {default_of(flag.field)!r})")
            continue
        if isinstance(value, list | tuple):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, dict):
            raise ConfigError(f"{key} must be a single value, got a mapping")
        out.append(f"--{key}={value}")
    return out


def yaml_to_args(path: str) -> list[str]:
    """The flat settings of a YAML file (``prune_rate: 0.9``) as flag tokens."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(
            f"--config {path}: not valid YAML ({' '.join(str(err).split())})"
        ) from None
    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings at the top")
    return dict_to_args({str(k): v for k, v in raw.items()}, source=f"--config {path}")


def _valid_names_hint(key: str) -> str:
    names = [f.name for f in select_flags()]
    close = difflib.get_close_matches(key, names, n=1)
    if close:
        return f"did you mean {close[0]}? (`speccore select --help` lists them all)"
    return "`speccore select --help` lists the valid settings"


def bench_set_fields() -> dict[str, str]:
    """The SelectConfig fields a bench sets itself, and where it takes them from."""
    return {f.name: f.metadata["bench"] for f in fields(SelectConfig) if "bench" in f.metadata}


def token_fields() -> list[str]:
    """Token-level selection settings (``metadata['token']``)."""
    return [f.name for f in fields(SelectConfig) if f.metadata.get("token")]


def coreset_size(n: int, prune_rate: float) -> int:
    """m = ⌊N·(1−p)⌋, exactly: in floating point ⌊1000·(1−0.9)⌋ is 99, not 100.

    ``p`` is read through its shortest decimal repr (0.9 → 9/10), which is what a user typed.
    """
    if not 0 <= prune_rate < 1:
        raise ConfigError(f"prune rate must be in [0, 1), got {prune_rate}")
    p = Fraction(repr(float(prune_rate)))
    m = (n * (1 - p)).__floor__()
    if m < 1:
        raise ConfigError(
            f"N·(1−p) = {n}·(1−{prune_rate}) < 1: the coreset would be empty; "
            "use a lower --prune-rate or more data"
        )
    return int(m)
