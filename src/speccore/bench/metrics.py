"""Evaluation metrics: ROUGE-L F1 (``rouge-score``), corpus BLEU-4 (``sacrebleu``) and the
reference NLL, with bootstrap confidence intervals over the evaluation samples.

Both come from the reference libraries; this module only adapts them:

* ROUGE-L: with several references a sample scores against its best one (the library's
  ``score_multi``); the bench reports the mean F1 × 100. The library's default tokenizer keeps
  only ``[a-z0-9]`` and so drops every non-ASCII letter ("größe" and "gräße" both become
  ``gr e``): for other languages :class:`UnicodeTokenizer` splits on ``\\W+`` instead.
* BLEU-4: sacrebleu's corpus BLEU (13a tokenisation, exp smoothing). For the bootstrap each
  sentence's sufficient statistics (n-gram matches and totals, lengths) are computed once with
  sacrebleu; a resample sums them and calls sacrebleu's own ``BLEU.compute_bleu``, which is what
  ``corpus_bleu`` does on the whole corpus: a resample costs microseconds instead of a rescoring.
  :func:`bleu_from_statistics_batch` is the same formula on many summed statistics at once
  (numpy), for the thousands of resamples of the paired comparisons.
* Reference NLL: the mean token negative log-likelihood of each evaluation row's reference
  response under the model (teacher forcing, response tokens only), through the same per-sample
  ``loss`` score the selections use (:func:`reference_nll_rows`). Lower is better.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..utils.errors import ConfigError

if TYPE_CHECKING:
    from ..data.batches import TokenizedData

logger = logging.getLogger(__name__)

ROUGE_TOKENIZERS = ("auto", "default", "unicode")
_MAX_ORDER = 4
_WORD_SPLIT = re.compile(r"\W+", re.UNICODE)


def _tokenizer_base() -> type:
    from rouge_score.tokenizers import Tokenizer

    return Tokenizer


class UnicodeTokenizer(_tokenizer_base()):  # type: ignore[misc]
    """ROUGE tokenizer for any script: lowercase, split on non-word characters (Unicode-aware).

    No stemming: the Porter stemmer that ``use_stemmer`` enables is for English only.
    """

    def tokenize(self, text: str) -> list[str]:
        return [t for t in _WORD_SPLIT.split(text.lower()) if t]


@dataclass(frozen=True)
class MetricSettings:
    """How predictions are scored.

    ``language``: the references' language; ``en`` gets the library's default ROUGE tokenizer
    with the Porter stemmer, any other language the Unicode tokenizer without stemming
    (``rouge_tokenizer: auto``). ``rouge_tokenizer`` forces ``default`` or ``unicode``.
    ``bootstrap`` resamples of per-sample ROUGE-L and ``bleu_bootstrap`` of corpus BLEU give the
    ``confidence`` interval, seeded by ``bootstrap_seed``. ``generate_rows``: how many of the
    evaluation rows (the first ones) are generated on for ROUGE-L and BLEU-4; ``None``: all of
    them, ``0``: none (the cell is scored by its reference NLL only, on every evaluation row,
    which costs one forward pass per row instead of a decode per token).
    """

    language: str = "en"
    rouge_tokenizer: str = "auto"
    bleu_tokenize: str = "13a"
    bootstrap: int = 1000
    bleu_bootstrap: int = 200
    bootstrap_seed: int = 0
    confidence: float = 0.95
    generate_rows: int | None = None

    def validate(self) -> None:
        if self.generate_rows is not None and self.generate_rows < 0:
            raise ConfigError(
                "metrics.generate_rows must be >= 0 (0: reference NLL only; leave it out to "
                f"generate on every evaluation row), got {self.generate_rows}"
            )
        if self.rouge_tokenizer not in ROUGE_TOKENIZERS:
            raise ConfigError(
                f"metrics.rouge_tokenizer must be one of {', '.join(ROUGE_TOKENIZERS)}, "
                f"got {self.rouge_tokenizer!r}"
            )
        if self.bootstrap < 0 or self.bleu_bootstrap < 0:
            raise ConfigError("metrics.bootstrap and metrics.bleu_bootstrap must be >= 0")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"metrics.confidence must be in (0, 1), got {self.confidence}")
        from sacrebleu.metrics.bleu import BLEU

        if self.bleu_tokenize not in BLEU.TOKENIZERS:
            raise ConfigError(
                f"metrics.bleu_tokenize must be a sacrebleu tokenizer "
                f"({', '.join(BLEU.TOKENIZERS)}), got {self.bleu_tokenize!r}"
            )

    @property
    def unicode_rouge(self) -> bool:
        if self.rouge_tokenizer == "auto":
            return self.language.lower() not in ("en", "english")
        return self.rouge_tokenizer == "unicode"


def rouge_scorer(settings: MetricSettings) -> Any:
    """A ``rouge_score.rouge_scorer.RougeScorer`` for ROUGE-L as ``settings`` asks."""
    from rouge_score import rouge_scorer as rs

    if settings.unicode_rouge:
        return rs.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=UnicodeTokenizer())
    return rs.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    settings: MetricSettings | None = None,
) -> np.ndarray:
    """Per-sample ROUGE-L F1 in [0, 1], each sample against its best reference."""
    settings = settings or MetricSettings()
    _check_lengths(predictions, references)
    scorer = rouge_scorer(settings)
    return np.array(
        [
            scorer.score_multi(list(refs), pred)["rougeL"].fmeasure
            for pred, refs in zip(predictions, references, strict=True)
        ],
        dtype=np.float64,
    )


def _bleu(settings: MetricSettings, effective_order: bool) -> Any:
    from sacrebleu.metrics.bleu import BLEU

    settings.validate()
    return BLEU(tokenize=settings.bleu_tokenize, effective_order=effective_order)


def corpus_bleu(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    settings: MetricSettings | None = None,
) -> float:
    """sacrebleu corpus BLEU-4 (0-100); each sample may have several references."""
    settings = settings or MetricSettings()
    _check_lengths(predictions, references)
    streams = [list(s) for s in zip(*references, strict=True)]  # one stream per reference slot
    return float(
        _bleu(settings, effective_order=False).corpus_score(list(predictions), streams).score
    )


def bleu_statistics(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    settings: MetricSettings | None = None,
) -> np.ndarray:
    """Per-sentence BLEU sufficient statistics, shape (n, 2 + 2·4): hypothesis length, closest
    reference length, then matched and total n-grams for n = 1..4 (sacrebleu's layout)."""
    settings = settings or MetricSettings()
    _check_lengths(predictions, references)
    # effective_order only changes a sentence's own score (unused here), not its statistics;
    # setting it silences sacrebleu's advice for sentence-level BLEU.
    bleu = _bleu(settings, effective_order=True)
    rows = []
    for pred, refs in zip(predictions, references, strict=True):
        s = bleu.sentence_score(pred, list(refs))
        rows.append([s.sys_len, s.ref_len, *s.counts, *s.totals])
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), 2 + 2 * _MAX_ORDER)


def bleu_from_statistics(stats: np.ndarray) -> float:
    """Corpus BLEU-4 from summed sufficient statistics (as ``corpus_bleu`` computes it)."""
    from sacrebleu.metrics.bleu import BLEU

    total = np.asarray(stats, dtype=np.int64)
    if total.ndim == 2:
        total = total.sum(axis=0)
    score = BLEU.compute_bleu(
        correct=[int(x) for x in total[2 : 2 + _MAX_ORDER]],
        total=[int(x) for x in total[2 + _MAX_ORDER :]],
        sys_len=int(total[0]),
        ref_len=int(total[1]),
        smooth_method="exp",
    )
    return float(score.score)


def bleu_from_statistics_batch(totals: np.ndarray) -> np.ndarray:
    """Corpus BLEU-4 (0-100) of many summed statistics at once: ``totals`` (..., 10) in the
    layout of :func:`bleu_statistics`, returns shape (...).

    sacrebleu's ``BLEU.compute_bleu`` with exp smoothing, vectorised: 0 without any matched
    n-gram or with an order of no n-gram at all (sacrebleu stops there and its floored log of
    the missing precisions gives 0); otherwise the k-th order without a match counts as
    ``1 / (2^k · total)``, and the brevity penalty applies when the hypotheses are shorter.
    """
    t = np.asarray(totals, dtype=np.float64)
    sys_len, ref_len = t[..., 0], t[..., 1]
    correct, total = t[..., 2 : 2 + _MAX_ORDER], t[..., 2 + _MAX_ORDER :]
    valid = (total > 0).all(axis=-1) & (correct > 0).any(axis=-1)
    # Invalid entries are computed on safe stand-ins and zeroed at the end.
    safe_total = np.where(total > 0, total, 1.0)
    safe_sys = np.where(sys_len > 0, sys_len, 1.0)
    zero = correct == 0
    smooth = 2.0 ** np.cumsum(zero, axis=-1)
    precision = np.where(zero, 100.0 / (smooth * safe_total), 100.0 * correct / safe_total)
    shorter = np.where(sys_len > 0, np.exp(1.0 - ref_len / safe_sys), 0.0)
    bp = np.where(sys_len < ref_len, shorter, 1.0)
    score = bp * np.exp(np.log(precision).sum(axis=-1) / _MAX_ORDER)
    return np.where(valid, score, 0.0)


def bootstrap_mean_ci(
    values: np.ndarray, resamples: int, seed: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling samples)."""
    values = np.asarray(values, dtype=np.float64)
    if resamples == 0 or len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng([seed, 0xB007])
    means = np.empty(resamples)
    # Chunked so that 1000 resamples of 10k samples never hold 10M indices at once.
    chunk = max(1, 2_000_000 // max(1, len(values)))
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, len(values), size=(stop - start, len(values)))
        means[start:stop] = values[idx].mean(axis=1)
    return _percentiles(means, confidence)


def bootstrap_bleu_ci(
    stats: np.ndarray, resamples: int, seed: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of corpus BLEU, resampling sentences."""
    stats = np.asarray(stats, dtype=np.int64)
    if resamples == 0 or len(stats) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng([seed, 0xB1E0])
    totals = np.empty((resamples, stats.shape[1]), dtype=np.int64)
    for r in range(resamples):
        idx = rng.integers(0, len(stats), size=len(stats))
        totals[r] = stats[idx].sum(axis=0)
    return _percentiles(bleu_from_statistics_batch(totals), confidence)


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def evaluate(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    settings: MetricSettings | None = None,
) -> dict[str, Any]:
    """ROUGE-L (mean F1 × 100) and BLEU-4 with their bootstrap intervals, and per-sample ROUGE-L.

    Returns ``rougeL``, ``rougeL_lo``, ``rougeL_hi``, ``bleu4``, ``bleu4_lo``, ``bleu4_hi``,
    ``n_eval`` and ``rougeL_per_sample`` (0-100, for later resampling or inspection).
    :func:`evaluate_rows` returns the same metrics with every per-row value the paired
    comparisons need.
    """
    metrics, per_row = evaluate_rows(predictions, references, settings)
    return {**metrics, "rougeL_per_sample": per_row["rougeL"]}


def evaluate_rows(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    settings: MetricSettings | None = None,
    nll: Sequence[float] | np.ndarray | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A cell's metrics and its per-row values: ``(metrics, per_row)``.

    ``metrics``: ``rougeL``, ``rougeL_lo``, ``rougeL_hi``, ``bleu4``, ``bleu4_lo``,
    ``bleu4_hi``, ``n_eval``, and with ``nll`` (the rows' reference NLL, from
    :func:`reference_nll_rows`) also :func:`nll_metrics`'s keys.
    ``per_row`` (JSON-ready lists, the cell record's ``per_row``): ``rougeL`` (per-row F1 ×
    100), ``bleu4_stats`` (per-row BLEU sufficient statistics, n × 10 integers: corpus BLEU of
    any subset of rows is a function of their sum) and, with ``nll``, ``nll``.
    """
    settings = settings or MetricSettings()
    if not predictions:
        raise ConfigError("no evaluation samples: data.eval_rows must be >= 1")
    per_sample = rouge_l(predictions, references, settings) * 100
    r_lo, r_hi = bootstrap_mean_ci(
        per_sample, settings.bootstrap, settings.bootstrap_seed, settings.confidence
    )
    stats = bleu_statistics(predictions, references, settings)
    b_lo, b_hi = bootstrap_bleu_ci(
        stats, settings.bleu_bootstrap, settings.bootstrap_seed, settings.confidence
    )
    metrics: dict[str, Any] = {
        "rougeL": float(per_sample.mean()),
        "rougeL_lo": r_lo,
        "rougeL_hi": r_hi,
        "bleu4": corpus_bleu(predictions, references, settings),
        "bleu4_lo": b_lo,
        "bleu4_hi": b_hi,
        "n_eval": len(predictions),
    }
    per_row: dict[str, Any] = {"rougeL": per_sample.tolist(), "bleu4_stats": stats.tolist()}
    if nll is not None:
        values = np.asarray(nll, dtype=np.float64)
        metrics.update(nll_metrics(values, settings))
        per_row["nll"] = values.tolist()
    return metrics, per_row


def nll_metrics(values: np.ndarray, settings: MetricSettings | None = None) -> dict[str, Any]:
    """``nll`` (mean over rows of each row's mean token NLL, nats), its bootstrap interval
    ``nll_lo``/``nll_hi`` over the rows, and ``n_nll`` (rows scored)."""
    settings = settings or MetricSettings()
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0 or not np.isfinite(values).all():
        raise ValueError("reference NLL needs one finite value per evaluation row")
    lo, hi = bootstrap_mean_ci(
        values, settings.bootstrap, settings.bootstrap_seed, settings.confidence
    )
    return {"nll": float(values.mean()), "nll_lo": lo, "nll_hi": hi, "n_nll": len(values)}


def reference_nll_rows(model: Any, data: TokenizedData, max_batch_tokens: int = 4096) -> np.ndarray:
    """Mean token negative log-likelihood (nats) of each row's reference response under
    ``model``: teacher forcing, response tokens only (the prompt's labels are -100, as in
    training). Float64, one value per row of ``data``.

    ``data`` is the evaluation rows tokenised like the training rows (``tokenize_dataset``
    with the bench's formatting, ``max_length`` and truncation side), so the response is the
    training output field. It is scored by :func:`speccore.scoring.score_samples` with the
    ``loss`` score (the mean cross-entropy over a row's counted tokens): one path with the
    selections' loss scores. Token masks of ``data`` (token-level selection) are dropped: the
    metric counts every response token. The model runs in eval mode without gradients; a row
    without response tokens raises :class:`~speccore.utils.errors.ScoringError` naming it.
    """
    from ..data.batches import TokenizedData
    from ..scoring import score_samples

    every_token = TokenizedData(data.input_ids, data.labels, data.pad_token_id)
    return score_samples(
        model, every_token, "loss", max_batch_tokens=max_batch_tokens, desc="reference NLL"
    )


def _check_lengths(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference sets")
    counts = {len(r) for r in references}
    if 0 in counts:
        raise ValueError("every sample needs at least one reference")
    if len(counts) > 1:
        # sacrebleu takes reference *streams*: every sample needs the same number.
        raise ValueError(f"samples have different numbers of references: {sorted(counts)}")
