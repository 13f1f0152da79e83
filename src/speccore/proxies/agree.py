"""How well a small model agrees with its target: the check to run before trusting a small model.

STAFF ranks samples by the small model's scores and splits them into K equal-width regions; the
target only verifies a few samples per region. The small model is worth using when its scores
order the samples as the target's do (Spearman) and put them into the same regions (Rand index),
at a lower cost per token. :func:`agreement` measures the three on a seeded random sample of
rows, both models untuned (a fresh LoRA adapter, as STAFF scores them). To compare one target
with several small models, score each model once with :func:`score_rows` and :func:`compare`
the pairs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..config import LoraSettings
from ..data.batches import TokenizedData
from ..selection.agreement import MIN_SAMPLES, rand_index, spearman
from ..utils.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

#: Fewest rows agreement is measured on (Spearman's minimum; the Rand index needs 2).
MIN_ROWS = MIN_SAMPLES

AgreementData = TokenizedData | tuple[TokenizedData, TokenizedData] | Callable[[Any], TokenizedData]


@dataclass
class AgreementReport:
    """Agreement of ``small`` with ``target`` on ``rows`` sampled rows (see :func:`agreement`).

    ``spearman`` and ``rand_index`` map each score (``effort``, ``loss``) to its value (None when
    undefined, e.g. constant scores). ``*_seconds`` is the scoring time of every score on the
    sampled rows; ``*_tokens`` the rows' tokens (each model's own tokenisation).
    """

    small: str
    target: str
    rows: int
    regions: int
    seed: int
    same_family: bool
    spearman: dict[str, float | None]
    rand_index: dict[str, float | None]
    small_seconds: float
    target_seconds: float
    small_tokens: int
    target_tokens: int
    indices: list[int] = field(default_factory=list)
    small_scores: dict[str, list[float]] = field(default_factory=dict)
    target_scores: dict[str, list[float]] = field(default_factory=dict)

    @property
    def small_seconds_per_token(self) -> float:
        return self.small_seconds / max(self.small_tokens, 1)

    @property
    def target_seconds_per_token(self) -> float:
        return self.target_seconds / max(self.target_tokens, 1)

    @property
    def cost_ratio(self) -> float:
        """Small/target cost per token (below 1: the small model is cheaper)."""
        target = self.target_seconds_per_token
        return self.small_seconds_per_token / target if target > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the fields plus the per-token costs and their ratio."""
        out = asdict(self)
        out["small_seconds_per_token"] = self.small_seconds_per_token
        out["target_seconds_per_token"] = self.target_seconds_per_token
        out["cost_ratio"] = self.cost_ratio
        return out

    def format(self) -> str:
        """A short text table."""
        family = "same family" if self.same_family else "DIFFERENT families (tokenizers)"
        lines = [
            f"small  {self.small}",
            f"target {self.target}",
            f"{self.rows} rows (seed {self.seed}), K = {self.regions} equal-width regions, {family}",
            "",
            f"{'score':<8} {'Spearman':>9} {'Rand index':>11}",
        ]
        for score in self.spearman:
            lines.append(
                f"{score:<8} {_num(self.spearman[score]):>9} {_num(self.rand_index[score]):>11}"
            )
        lines += [
            "",
            f"cost per token: small {1e3 * self.small_seconds_per_token:.3f} ms, "
            f"target {1e3 * self.target_seconds_per_token:.3f} ms "
            f"(small/target {self.cost_ratio:.2f})",
        ]
        return "\n".join(lines)


def agreement(
    small: Any,
    target: Any,
    data: AgreementData,
    *,
    rows: int = 200,
    regions: int = 10,
    seed: int = 0,
    scores: Sequence[str] = ("effort", "loss"),
    lora: LoraSettings | None = None,
    lora_seed: int = 0,
    max_batch_tokens: int = 4096,
    dtype: str = "auto",
    device: str = "auto",
) -> AgreementReport:
    """Score a seeded random sample of rows on both models and compare the scores.

    ``small``/``target``: model names or :class:`~speccore.models.LoadedModel` (plain models; a
    fresh LoRA adapter of ``lora``'s shape, seeded with ``lora_seed``, is attached for scoring and
    removed afterwards, so an effort score exists and the loss is the base model's). ``data``:
    the rows tokenised for both (same tokenizer), a ``(small_data, target_data)`` pair aligned by
    row, or a function ``tokenizer -> TokenizedData`` (cross-family pairs). ``rows`` rows (all
    when fewer) are drawn with ``seed``. ``scores`` are :data:`~speccore.scoring.SCORE_FUNCTIONS`
    keys. Per score: Spearman of the two models' scores and the Rand index of the ``regions``
    equal-width regions each induces. Models given by name are loaded one after the other and
    freed after scoring.
    """
    if regions < 1:
        raise ConfigError(f"--regions must be >= 1, got {regions}")
    options = _options(rows, seed, scores, lora, lora_seed, max_batch_tokens, dtype, device)
    _check_row_count(data)
    small_run = _score_model(small, data, 0, options, None)
    target_run = _score_model(target, data, 1, options, small_run)
    return compare(small_run, target_run, regions=regions)


def score_rows(
    model: Any,
    data: TokenizedData | Callable[[Any], TokenizedData],
    *,
    rows: int = 200,
    seed: int = 0,
    scores: Sequence[str] = ("effort", "loss"),
    lora: LoraSettings | None = None,
    lora_seed: int = 0,
    max_batch_tokens: int = 4096,
    dtype: str = "auto",
    device: str = "auto",
) -> ScoredRows:
    """One side of :func:`agreement`: ``model``'s scores of the seeded sample of rows.

    Score a target once and :func:`compare` it with several small models (the arguments mean
    what they mean for :func:`agreement`; ``data`` is this model's tokenised rows or a function
    ``tokenizer -> TokenizedData``).
    """
    options = _options(rows, seed, scores, lora, lora_seed, max_batch_tokens, dtype, device)
    return _score_model(model, data, 0, options, None)


def _options(
    rows: int,
    seed: int,
    scores: Sequence[str],
    lora: LoraSettings | None,
    lora_seed: int,
    max_batch_tokens: int,
    dtype: str,
    device: str,
) -> _Options:
    """The scoring options both sides share, checked."""
    if rows < MIN_ROWS:
        raise ConfigError(f"--rows must be >= {MIN_ROWS} to compare rankings, got {rows}")
    if not scores:
        raise ConfigError("pass at least one score to compare (effort, loss)")
    return _Options(
        rows,
        seed,
        tuple(scores),
        lora or LoraSettings(),
        lora_seed,
        max_batch_tokens,
        dtype,
        device,
    )


def _check_row_count(data: AgreementData) -> None:
    """Tokenised data too short to rank is refused before a model loads (a function of the
    tokenizer is checked once it has run)."""
    sizes = [len(d) for d in (data if isinstance(data, tuple) else (data,)) if not callable(d)]
    if sizes and min(sizes) < MIN_ROWS:
        raise DataError(
            f"the data has {min(sizes)} row(s); comparing rankings needs at least {MIN_ROWS}"
        )


def compare(small: ScoredRows, target: ScoredRows, *, regions: int = 10) -> AgreementReport:
    """Spearman and Rand index of two models' scores of the same rows (:func:`score_rows`)."""
    if regions < 1:
        raise ConfigError(f"--regions must be >= 1, got {regions}")
    if small.n_rows != target.n_rows or not np.array_equal(small.indices, target.indices):
        raise DataError(
            f"{small.name} and {target.name} scored different rows: score both with the same "
            "data, --rows and --seed"
        )
    common = [s for s in small.scores if s in target.scores]
    if not common:
        raise ConfigError(f"{small.name} and {target.name} share no score to compare")
    from ..models import check_family

    # Warns (once, with the usual explanation) when the pair is cross-family.
    same = check_family(small.tokenizer, target.tokenizer, small.name, target.name)
    report = AgreementReport(
        small=small.name,
        target=target.name,
        rows=len(small.indices),
        regions=regions,
        seed=small.seed,
        same_family=same,
        spearman={s: spearman(small.scores[s], target.scores[s]) for s in common},
        rand_index={s: rand_index(small.scores[s], target.scores[s], regions) for s in common},
        small_seconds=small.seconds,
        target_seconds=target.seconds,
        small_tokens=small.tokens,
        target_tokens=target.tokens,
        indices=[int(i) for i in small.indices],
        small_scores={s: small.scores[s].tolist() for s in common},
        target_scores={s: target.scores[s].tolist() for s in common},
    )
    logger.info("agreement:\n%s", report.format())
    return report


def sample_rows(n: int, rows: int, seed: int) -> np.ndarray:
    """``min(rows, n)`` distinct row indices drawn with ``seed``, ascending."""
    if rows >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=rows, replace=False)).astype(np.int64)


# --- scoring one model -----------------------------------------------------------------------


@dataclass
class ScoredRows:
    """One model's scores of a seeded sample of rows (:func:`score_rows`).

    ``n_rows``: rows in the data; ``indices``: the sampled rows; ``seconds``: the scoring time
    of every score (model loading and a one-row warm-up excluded); ``tokens``: the sampled
    rows' tokens in this model's tokenisation.
    """

    name: str
    tokenizer: Any
    n_rows: int
    seed: int
    indices: np.ndarray
    scores: dict[str, np.ndarray]
    seconds: float
    tokens: int


@dataclass(frozen=True)
class _Options:
    rows: int
    seed: int
    scores: tuple[str, ...]
    lora: LoraSettings
    lora_seed: int
    max_batch_tokens: int
    dtype: str
    device: str


def _score_model(
    model: Any, data: AgreementData, side: int, opt: _Options, small: ScoredRows | None
) -> ScoredRows:
    """Load (if named), tokenise, score the sampled rows with a fresh adapter, clean up.

    ``small``: the small model's run, when this is the target: its data must match.
    """
    from ..models import LoadedModel, attach_lora, detach_lora, load_model
    from ..scoring import score_samples

    if isinstance(model, LoadedModel):
        loaded = model
    else:
        loaded = load_model(model, dtype=opt.dtype, device=opt.device)
    tokens_data = _data_for(data, side, loaded.tokenizer)
    if len(tokens_data) < MIN_ROWS:
        raise DataError(
            f"the data has {len(tokens_data)} row(s); comparing rankings needs at least {MIN_ROWS}"
        )
    if small is not None:
        _check_pair(small, loaded, len(tokens_data), data)
    scores = opt.scores
    idx = sample_rows(len(tokens_data), opt.rows, opt.seed)
    peft_model = attach_lora(loaded.model, opt.lora, seed=opt.lora_seed)
    try:
        # One untimed row first: the first call pays one-off costs (kernels, allocator).
        score_samples(peft_model, tokens_data, scores[0], indices=idx[:1], desc="warm-up")
        values: dict[str, np.ndarray] = {}
        start = time.perf_counter()
        for score in scores:
            values[score] = score_samples(
                peft_model,
                tokens_data,
                score,
                indices=idx,
                max_batch_tokens=opt.max_batch_tokens,
                desc=f"{score} ({loaded.source.name})",
            )
        seconds = time.perf_counter() - start
    finally:
        detach_lora(peft_model)
    return ScoredRows(
        name=loaded.source.name,
        tokenizer=loaded.tokenizer,
        n_rows=len(tokens_data),
        seed=opt.seed,
        indices=idx,
        scores=values,
        seconds=seconds,
        tokens=int(tokens_data.lengths[idx].sum()),
    )


def _check_pair(small: ScoredRows, target: Any, n_rows: int, data: AgreementData) -> None:
    """The target's data must hold the small model's rows; one tokenisation needs one vocab."""
    if n_rows != small.n_rows:
        raise DataError(
            f"the small model's data has {small.n_rows} rows, the target's {n_rows}: both "
            "must hold the same rows in the same order"
        )
    if (
        isinstance(data, TokenizedData)
        and target.tokenizer.get_vocab() != small.tokenizer.get_vocab()
    ):
        raise ConfigError(
            f"{small.name} and {target.source.name} have different tokenizers: pass the data "
            "tokenised for each, as a (small_data, target_data) pair or a tokenizer function"
        )


def _data_for(data: AgreementData, side: int, tokenizer: Any) -> TokenizedData:
    if isinstance(data, TokenizedData):
        return data
    if isinstance(data, tuple):
        if len(data) != 2:
            raise ConfigError("pass the data as one TokenizedData or a (small, target) pair")
        return data[side]
    return data(tokenizer)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
