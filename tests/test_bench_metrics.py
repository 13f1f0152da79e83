"""Bench metrics: ROUGE-L (rouge-score) and BLEU-4 (sacrebleu) wrappers against hand-computed
values, the Unicode ROUGE tokenizer on German, and the bootstrap intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from speccore.bench.metrics import (
    MetricSettings,
    UnicodeTokenizer,
    bleu_from_statistics,
    bleu_from_statistics_batch,
    bleu_statistics,
    bootstrap_bleu_ci,
    bootstrap_mean_ci,
    corpus_bleu,
    evaluate,
    evaluate_rows,
    nll_metrics,
    rouge_l,
)
from speccore.utils.errors import ConfigError

REF = "the cat sat on the mat"


def test_identical_scores_100_and_disjoint_scores_0() -> None:
    assert rouge_l([REF], [[REF]])[0] == pytest.approx(1.0)
    assert corpus_bleu([REF], [[REF]]) == pytest.approx(100.0)
    assert rouge_l(["dogs bark loudly"], [[REF]])[0] == 0.0
    assert corpus_bleu(["dogs bark loudly"], [[REF]]) == 0.0


def test_rouge_l_against_the_longest_common_subsequence_by_hand() -> None:
    # "the cat on the mat": LCS 5 of 5 predicted and 6 reference tokens: F = 2·1·(5/6)/(1+5/6)
    # "cat the mat": LCS "cat … the mat" = 3: P = 1, R = 1/2, F = 2/3
    scores = rouge_l(["the cat on the mat", "cat the mat"], [[REF], [REF]])
    assert scores == pytest.approx([10 / 11, 2 / 3])


def test_rouge_l_takes_the_best_reference() -> None:
    scores = rouge_l(["cat the mat"], [["dogs bark", REF]])
    assert scores[0] == pytest.approx(2 / 3)


def test_bleu_against_hand_counted_ngrams() -> None:
    # "the cat sat on a mat": 1-grams 5/6, 2-grams 3/5, 3-grams 2/4, 4-grams 1/3, same length.
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert corpus_bleu(["the cat sat on a mat"], [[REF]]) == pytest.approx(expected)
    # A second reference that matches exactly wins the clipping and the length.
    assert corpus_bleu(["the cat sat on a mat"], [[REF, "the cat sat on a mat"]]) == pytest.approx(
        100
    )


def test_bleu_statistics_sum_to_sacrebleus_corpus_bleu() -> None:
    preds = ["the cat sat on a mat", "hello world there", "a b c d e f", "x"]
    refs = [
        [REF, "x y"],
        ["hello there world", "hello world"],
        ["a b c x e f", "q"],
        ["x y z", "y"],
    ]
    stats = bleu_statistics(preds, refs)
    assert stats.shape == (4, 10)
    assert stats[0].tolist() == [6, 6, 5, 3, 2, 1, 6, 5, 4, 3]
    assert bleu_from_statistics(stats) == pytest.approx(corpus_bleu(preds, refs))


def test_vectorised_bleu_is_sacrebleus_formula() -> None:
    rng = np.random.default_rng(3)
    cases = [rng.integers(0, 6, 10) for _ in range(300)]
    # Counts that can happen: matches <= totals, shorter and longer hypotheses, no 4-grams.
    cases += [np.array([3, 6, 2, 0, 0, 0, 3, 2, 1, 0]), np.array([5, 4, 0, 0, 0, 0, 5, 4, 3, 2])]
    cases += [np.array([9, 12, 7, 4, 0, 1, 9, 8, 7, 6]), np.zeros(10, dtype=int)]
    for stats in cases:
        stats[2:6] = np.minimum(stats[2:6], stats[6:10])
        expected = bleu_from_statistics(stats)
        assert bleu_from_statistics_batch(stats[None])[0] == pytest.approx(expected, abs=1e-9)
    # On a whole corpus: the summed per-row statistics give sacrebleu's corpus score.
    preds = ["the cat sat on a mat", "hello world there", "a b c d e f", "x", "dogs bark"]
    refs = [[REF], ["hello there world"], ["a b c x e f"], ["x y z"], [REF]]
    stats = bleu_statistics(preds, refs)
    whole = corpus_bleu(preds, refs)
    assert whole > 20  # matches at every order, a brevity penalty: not a degenerate 0
    assert bleu_from_statistics_batch(stats.sum(axis=0)) == pytest.approx(whole, abs=1e-9)


def test_default_tokenizer_drops_umlauts_the_unicode_one_does_not() -> None:
    pred, ref = "die Größe ändern", "die Gräße ändern"
    # rouge-score's default tokenizer keeps [a-z0-9] only: "größe" and "gräße" both become "gr e".
    assert rouge_l([pred], [[ref]], MetricSettings(language="en"))[0] == pytest.approx(1.0)
    assert UnicodeTokenizer().tokenize("Die GRÖßE, ändern!") == ["die", "größe", "ändern"]
    for settings in (MetricSettings(language="de"), MetricSettings(rouge_tokenizer="unicode")):
        # LCS "die … ändern": 2 of 3 tokens on both sides.
        assert rouge_l([pred], [[ref]], settings)[0] == pytest.approx(2 / 3)
    assert rouge_l(["die Größe ändern"], [["Die größe ändern"]], MetricSettings(language="de"))[
        0
    ] == pytest.approx(1.0)


def test_bootstrap_intervals_are_seeded_and_bracket_the_estimate() -> None:
    values = np.random.default_rng(0).uniform(0, 100, size=200)
    lo, hi = bootstrap_mean_ci(values, 500, seed=3)
    assert lo < values.mean() < hi
    assert (lo, hi) == bootstrap_mean_ci(values, 500, seed=3)
    assert (lo, hi) != bootstrap_mean_ci(values, 500, seed=4)
    assert bootstrap_mean_ci(np.full(10, 42.0), 100, seed=0) == (42.0, 42.0)
    assert all(math.isnan(x) for x in bootstrap_mean_ci(values, 0, seed=0))


def test_bleu_bootstrap_interval_brackets_corpus_bleu() -> None:
    rng = np.random.default_rng(1)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "house"]
    refs = [[" ".join(rng.choice(words, 8))] for _ in range(60)]
    preds = [r[0] if i % 3 else " ".join(rng.choice(words, 8)) for i, r in enumerate(refs)]
    stats = bleu_statistics(preds, refs)
    lo, hi = bootstrap_bleu_ci(stats, 200, seed=0)
    assert lo < corpus_bleu(preds, refs) < hi
    assert (lo, hi) == bootstrap_bleu_ci(stats, 200, seed=0)


def test_evaluate_reports_both_metrics_with_intervals() -> None:
    preds = ["the cat sat on a mat", "dogs bark", REF]
    refs = [[REF], [REF], [REF]]
    out = evaluate(preds, refs, MetricSettings(bootstrap=200, bleu_bootstrap=50))
    assert out["n_eval"] == 3
    assert out["rougeL"] == pytest.approx(np.mean(out["rougeL_per_sample"]))
    assert out["rougeL_per_sample"][2] == pytest.approx(100.0)
    assert out["rougeL_per_sample"][1] == 0.0
    assert out["rougeL_lo"] <= out["rougeL"] <= out["rougeL_hi"]
    assert out["bleu4"] == pytest.approx(corpus_bleu(preds, refs))


def test_evaluate_rows_keeps_every_per_row_value() -> None:
    preds = ["the cat sat on a mat", "dogs bark", REF]
    refs = [[REF], [REF], [REF]]
    settings = MetricSettings(bootstrap=200, bleu_bootstrap=50)
    metrics, per_row = evaluate_rows(preds, refs, settings)
    assert metrics == {
        k: v for k, v in evaluate(preds, refs, settings).items() if k != "rougeL_per_sample"
    }
    assert per_row.keys() == {"rougeL", "bleu4_stats"}  # no NLL given
    assert per_row["rougeL"] == evaluate(preds, refs, settings)["rougeL_per_sample"]
    assert bleu_from_statistics(np.array(per_row["bleu4_stats"])) == pytest.approx(metrics["bleu4"])
    metrics, per_row = evaluate_rows(preds, refs, settings, nll=[1.0, 3.0, 0.5])
    assert metrics["nll"] == pytest.approx(1.5) and metrics["n_nll"] == 3
    assert 0.5 <= metrics["nll_lo"] <= 1.5 <= metrics["nll_hi"] <= 3.0
    assert per_row["nll"] == [1.0, 3.0, 0.5]
    with pytest.raises(ValueError, match="finite"):
        nll_metrics(np.array([1.0, float("nan")]))


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="different numbers of references"):
        rouge_l(["a", "b"], [["a"], ["b", "c"]])
    with pytest.raises(ValueError, match="2 predictions but 1"):
        corpus_bleu(["a", "b"], [["a"]])
    with pytest.raises(ConfigError, match="rouge_tokenizer"):
        MetricSettings(rouge_tokenizer="spacy").validate()
    with pytest.raises(ConfigError, match="bleu_tokenize"):
        corpus_bleu(["a"], [["a"]], MetricSettings(bleu_tokenize="nope"))
