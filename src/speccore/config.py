"""Configuration dataclasses. The CLI maps onto them one to one (``--prune-rate`` ↔ ``prune_rate``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction
from typing import Any

from .errors import ConfigError

SCORES = ("effort", "loss", "el2n")
ALLOCATIONS = ("paper", "reference")
TOKEN_SCORERS = ("small", "target")
TOKEN_RANKS = ("sample", "global")


@dataclass
class LoraSettings:
    """LoRA adapter settings (peft), shared by every model speccore tunes or scores."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # None: every attention and MLP projection the architecture has.
    target_modules: list[str] | None = None


@dataclass
class TrainSettings:
    """LoRA fine-tuning: AdamW, linear warm-up then cosine decay."""

    epochs: float = 3.0
    learning_rate: float = 2e-4
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0


@dataclass
class SelectConfig:
    """Everything ``speccore select`` takes. Field ``foo_bar`` is CLI flag ``--foo-bar``."""

    data: str = field(
        default="", metadata={"help": "training data: file, saved dataset or hub name"}
    )
    input_field: str | None = field(default=None, metadata={"help": "prompt field"})
    output_field: str | None = field(default=None, metadata={"help": "response field"})
    template: str | None = field(
        default=None, metadata={"help": "prompt template with {field} placeholders"}
    )
    chat_template: bool = field(
        default=False, metadata={"help": "format prompts with the tokenizer's chat template"}
    )
    messages_field: str | None = field(
        default=None, metadata={"help": "field holding a list of {role, content} turns"}
    )
    group_field: str | None = field(
        default=None, metadata={"help": "field to report kept fractions by (e.g. topic)"}
    )
    split: str = field(default="train", metadata={"help": "split of a hub or saved dataset"})
    small: str | None = field(
        default=None, metadata={"help": "small model (hub name, folder, .gguf or alias)"}
    )
    target: str | None = field(default=None, metadata={"help": "target model"})
    method: str = field(default="staff", metadata={"help": "selection method"})
    prune_rate: float = field(default=0.9, metadata={"help": "fraction of samples to drop, [0, 1)"})
    score: str = field(default="effort", metadata={"help": "score function: effort | loss | el2n"})
    regions: int = field(default=50, metadata={"help": "K, regions of equal score width"})
    verify_per_region: int = field(default=10, metadata={"help": "b_v, target checks per region"})
    small_epochs: float = field(default=3.0, metadata={"help": "T, small-model fine-tune epochs"})
    target_epochs: float = field(
        default=3.0, metadata={"help": "target fine-tune epochs (GraNd, EL2N, CCS, D2)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the selection's random draws"})
    tune_seed: int = field(
        default=0,
        metadata={
            "help": "seed of LoRA init and fine-tune shuffles (apart from --seed, so that a "
            "new selection seed reuses cached adapters and scores)"
        },
    )
    max_length: int = field(default=512, metadata={"help": "max tokens; truncates the prompt"})
    truncation_side: str = field(
        default="left", metadata={"help": "which end of the prompt to cut: left | right"}
    )
    fill: bool = field(
        default=True, metadata={"help": "top the coreset up to exactly m (--no-fill: paper's <= m)"}
    )
    allocation: str = field(
        default="paper", metadata={"help": "paper | reference (the authors' public code)"}
    )
    verification: bool = field(
        default=True, metadata={"help": "--no-verification: ablation with every V_i = 1"}
    )
    ccs_beta: float = field(default=0.1, metadata={"help": "CCS hard-cutoff rate beta"})
    d2_k: int = field(default=5, metadata={"help": "D2 nearest neighbours"})
    d2_gamma_f: float = field(default=1.0, metadata={"help": "D2 forward message gamma"})
    d2_gamma_r: float = field(default=0.1, metadata={"help": "D2 reverse message gamma"})
    d2_strata: int | None = field(
        default=None, metadata={"help": "run D2 within CCS strata (the D2 paper's pipeline)"}
    )
    small_adapter: str | None = field(
        default=None, metadata={"help": "use this LoRA adapter instead of tuning the small model"}
    )
    scores: str | None = field(
        default=None, metadata={"help": "precomputed speculative scores (.npy, .npz or .json)"}
    )
    out: str | None = field(default=None, metadata={"help": "run folder for the outputs"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (training only)"})
    lora_target_modules: str | None = field(
        default=None, metadata={"help": "comma-separated module names (default: all projections)"}
    )
    learning_rate: float = field(default=2e-4, metadata={"help": "fine-tune learning rate"})
    batch_size: int = field(default=8, metadata={"help": "fine-tune batch size (samples)"})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "warm-up share of the steps"})
    # 1024 keeps a 262k-vocabulary target (Gemma) under ~7 GB on a CPU box; raise it on a GPU.
    max_batch_tokens: int = field(
        default=1024,
        metadata={"help": "batch size in padded tokens (scoring and fine-tune micro-batches)"},
    )
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    engine: str = field(default="local", metadata={"help": "scoring engine: local | ray"})
    dry_run: bool = field(
        default=False, metadata={"help": "score a few batches, print estimates, exit"}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "cache folder (default $SPECCORE_CACHE)"}
    )
    token_keep: float = field(
        default=1.0,
        metadata={"help": "fraction of response tokens to keep, (0, 1]; 1.0 = sample-level only"},
    )
    token_scorer: str = field(
        default="small",
        metadata={
            "help": "small | target: the base loss comes from the untuned small model or the "
            "untuned target"
        },
    )
    token_crossfit: bool = field(
        default=True,
        metadata={
            "help": "--no-token-crossfit reuses the STAFF adapter (scores its own training rows)"
        },
    )
    token_rank: str = field(default="sample", metadata={"help": "sample | global"})

    @property
    def lora(self) -> LoraSettings:
        modules = None
        if self.lora_target_modules:
            modules = [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]
        return LoraSettings(self.lora_r, self.lora_alpha, self.lora_dropout, modules)

    def train_settings(self, epochs: float) -> TrainSettings:
        return TrainSettings(
            epochs=epochs,
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            warmup_ratio=self.warmup_ratio,
            seed=self.tune_seed,
        )

    def validate(self) -> None:
        """Check ranges; raise :class:`ConfigError` naming the argument."""
        if not self.data:
            raise ConfigError("--data is required: a JSONL/CSV/Parquet file, folder or hub name")
        if not 0 <= self.prune_rate < 1:
            raise ConfigError(f"--prune-rate must be in [0, 1), got {self.prune_rate}")
        if self.regions < 1:
            raise ConfigError(f"--regions (K) must be >= 1, got {self.regions}")
        if self.verify_per_region < 1:
            raise ConfigError(
                f"--verify-per-region (b_v) must be >= 1, got {self.verify_per_region}"
            )
        if self.score not in SCORES:
            raise ConfigError(f"--score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(
                f"--allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}"
            )
        if self.truncation_side not in ("left", "right"):
            raise ConfigError(
                f"--truncation-side must be left or right, got {self.truncation_side!r}"
            )
        if self.max_length < 3:
            raise ConfigError(f"--max-length must be >= 3, got {self.max_length}")
        if self.small_epochs < 0 or self.target_epochs < 0:
            raise ConfigError("--small-epochs and --target-epochs must be >= 0")
        if self.engine not in ("local", "ray"):
            raise ConfigError(f"--engine must be local or ray, got {self.engine!r}")
        if self.engine == "ray":  # fail before any model work, not when scoring starts
            from .scoring.ray_engine import require_ray

            require_ray()
        if not 0 <= self.ccs_beta < 1:
            raise ConfigError(f"--ccs-beta must be in [0, 1), got {self.ccs_beta}")
        if self.d2_k < 1:
            raise ConfigError(f"--d2-k must be >= 1, got {self.d2_k}")
        self._validate_tokens()

    def _validate_tokens(self) -> None:
        """Token-level selection settings (issue 6)."""
        if not 0 < self.token_keep <= 1:
            raise ConfigError(f"--token-keep must be in (0, 1], got {self.token_keep}")
        if self.token_scorer not in TOKEN_SCORERS:
            raise ConfigError(
                f"--token-scorer must be one of {', '.join(TOKEN_SCORERS)}, "
                f"got {self.token_scorer!r}"
            )
        if self.token_rank not in TOKEN_RANKS:
            raise ConfigError(
                f"--token-rank must be one of {', '.join(TOKEN_RANKS)}, got {self.token_rank!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SelectConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}"
            )
        return cls(**d)


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
