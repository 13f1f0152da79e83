"""Paired differences between bench methods: the paired bootstrap against a hand-worked
5-row example and an exhaustive enumeration, resampled BLEU against sacrebleu on the resampled
sentences, the degenerate cases (constant difference, identical predictions), comparisons from
cell records (old and new), paired.csv, and the reference NLL against a hand-written loop."""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import forward_terms, mixed_prompt_data, tol
from speccore.bench.metrics import (
    MetricSettings,
    bleu_statistics,
    corpus_bleu,
    evaluate_rows,
    reference_nll_rows,
)
from speccore.bench.paired import (
    VS_BASE,
    VS_BEST,
    VS_RANDOM,
    compare_cells,
    paired_bleu_diff,
    paired_mean_diff,
    read_paired_csv,
    resample_counts,
    row_values,
    settings_from_cells,
    write_paired_csv,
)
from speccore.bench.tables import render_tables, variant_table
from speccore.data.batches import IGNORE_INDEX, TokenizedData
from speccore.models.tiny import tiny_causal_lm

# Two methods, 5 evaluation rows, 2 seeds (per-row ROUGE-L × 100).
A = np.array([[50, 40, 30, 20, 10], [55, 45, 35, 25, 15]], dtype=float)
B = np.array([[40, 42, 26, 20, 2], [47, 45, 29, 27, 9]], dtype=float)
# Differences: seed 0 [10, -2, 4, 0, 8] (mean 4.0), seed 1 [8, 0, 6, -2, 6] (mean 3.6);
# averaged over seeds per row: [9, -1, 5, -1, 7].


def test_paired_bootstrap_on_a_hand_worked_example() -> None:
    r = paired_mean_diff(A, B, resamples=20_000, seed=0)
    assert r.delta == pytest.approx(3.8)  # (4.0 + 3.6) / 2
    assert r.seed_std == pytest.approx(0.4 / math.sqrt(2))  # std of [4.0, 3.6], ddof 1
    assert (r.n_seeds, r.n_rows, r.resamples) == (2, 5, 20_000)
    # A resample draws 5 of the rows [9, -1, 5, -1, 7] (seeds kept together). Its mean is <= 0
    # only when all five draws are a -1 row: (2/5)^5 = 1.024%; four -1 rows and row 3 (mean
    # 0.2) add 5 · (2/5)^4 · (1/5) = 2.56%. So the 2.5% quantile is 0.2, and the two-sided p is
    # 2 · 1.024% = 0.02048.
    assert r.lo == pytest.approx(0.2)
    assert r.p == pytest.approx(0.02048, abs=0.004)
    # The upper end from all 5^5 equally likely resamples, enumerated.
    exact = np.array([sum(t) / 5 for t in itertools.product([9, -1, 5, -1, 7], repeat=5)])
    assert (exact <= 0).mean() == pytest.approx(0.01024)
    assert r.hi == pytest.approx(float(np.percentile(exact, 97.5)))  # 7.4
    assert r.hi == pytest.approx(7.4)


def test_resamples_keep_rows_and_seeds_paired() -> None:
    """The vectorised bootstrap against a loop that takes the same rows for both methods and
    every seed and averages the per-seed differences of means."""
    rng = np.random.default_rng(5)
    a, b = rng.uniform(0, 100, (3, 40)), rng.uniform(0, 100, (3, 40))
    r = paired_mean_diff(a, b, resamples=300, seed=7)
    draws = []
    for counts in resample_counts(40, 300, 7):
        for row in counts:
            idx = np.repeat(np.arange(40), row.astype(int))
            draws.append(np.mean([a[s, idx].mean() - b[s, idx].mean() for s in range(3)]))
    lo, hi = np.percentile(draws, [2.5, 97.5])
    assert (r.lo, r.hi) == pytest.approx((lo, hi))
    share = min((np.array(draws) <= 0).sum(), (np.array(draws) >= 0).sum())
    assert r.p == pytest.approx(min(1.0, 2 * (1 + share) / 301))
    # Seeded: the same seed gives the same interval, another seed another one.
    assert paired_mean_diff(a, b, 300, seed=7) == r
    assert paired_mean_diff(a, b, 300, seed=8).lo != r.lo


def test_constant_difference_gives_a_zero_width_interval_and_p_near_0() -> None:
    b = np.random.default_rng(0).uniform(0, 100, (3, 50)).round(2)
    r = paired_mean_diff(b + 2.5, b, resamples=1000, seed=0)
    assert r.delta == pytest.approx(2.5)
    assert r.hi - r.lo == pytest.approx(0.0, abs=1e-9)
    assert r.lo == pytest.approx(2.5)
    assert r.p == pytest.approx(2 / 1001)  # the smallest p 1000 resamples can give
    assert r.seed_std == pytest.approx(0.0, abs=1e-9)
    worse = paired_mean_diff(b - 1.0, b, resamples=1000, seed=0)
    assert worse.hi == pytest.approx(-1.0) and worse.p < 0.01


def test_identical_values_give_delta_0_and_p_1() -> None:
    a = np.random.default_rng(1).uniform(0, 100, (2, 30))
    r = paired_mean_diff(a, a.copy(), resamples=500, seed=0)
    assert (r.delta, r.lo, r.hi, r.p) == (0.0, 0.0, 0.0, 1.0)
    stats = np.random.default_rng(2).integers(1, 9, (2, 30, 10))
    rb = paired_bleu_diff(stats, stats.copy(), resamples=500, seed=0)
    assert (rb.delta, rb.lo, rb.hi, rb.p) == (0.0, 0.0, 0.0, 1.0)


def test_no_resamples_gives_the_estimate_without_interval() -> None:
    r = paired_mean_diff(A, B, resamples=0)
    assert r.delta == pytest.approx(3.8)
    assert all(math.isnan(x) for x in (r.lo, r.hi, r.p))
    with pytest.raises(ValueError, match="same shape"):
        paired_mean_diff(A, B[:, :4], resamples=10)


# --- BLEU --------------------------------------------------------------------------------------

REFS = [
    ["the cat sat on the mat"],
    ["a dog ran to the house"],
    ["red and blue are colours"],
    ["we travel to berlin tomorrow"],
    ["the report describes the sales"],
]
PRED_A = [  # per seed
    [
        "the cat sat on a mat",
        "a dog ran to a house",
        "red and blue are colours",
        "we go to berlin",
        "the report describes sales",
    ],
    [
        "the cat sat on the mat",
        "the dog ran home",
        "red and blue",
        "we travel to berlin tomorrow",
        "a report on the sales",
    ],
]
PRED_B = [
    ["a cat on the mat", "dog ran", "blue colours", "we travel to hamburg", "report the sales"],
    ["the cat sat", "a dog ran to", "red colours are", "to berlin", "the report describes"],
]


def test_paired_bleu_resamples_are_sacrebleu_on_the_resampled_sentences() -> None:
    stats = {
        name: np.stack([bleu_statistics(p, REFS) for p in preds])
        for name, preds in (("a", PRED_A), ("b", PRED_B))
    }
    r = paired_bleu_diff(stats["a"], stats["b"], resamples=40, seed=2)
    per_seed = [corpus_bleu(PRED_A[s], REFS) - corpus_bleu(PRED_B[s], REFS) for s in (0, 1)]
    assert r.delta == pytest.approx(np.mean(per_seed))
    assert r.seed_std == pytest.approx(np.std(per_seed, ddof=1))
    draws = []
    for counts in resample_counts(5, 40, 2):
        for row in counts:
            idx = np.repeat(np.arange(5), row.astype(int))
            refs = [REFS[i] for i in idx]
            draws.append(
                np.mean(
                    [
                        corpus_bleu([PRED_A[s][i] for i in idx], refs)
                        - corpus_bleu([PRED_B[s][i] for i in idx], refs)
                        for s in (0, 1)
                    ]
                )
            )
    assert (r.lo, r.hi) == pytest.approx(tuple(np.percentile(draws, [2.5, 97.5])), abs=1e-9)


def test_paired_bootstrap_is_fast_enough_for_a_bench() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0, 100, (3, 200)), rng.uniform(0, 100, (3, 200))
    start = time.perf_counter()
    paired_mean_diff(a, b, resamples=2000, seed=11)
    mean_seconds = time.perf_counter() - start
    stats_a, stats_b = rng.integers(0, 9, (3, 200, 10)), rng.integers(0, 9, (3, 200, 10))
    start = time.perf_counter()
    paired_bleu_diff(stats_a, stats_b, resamples=2000, seed=11)
    bleu_seconds = time.perf_counter() - start
    # About 0.05 s and 0.1 s on the 2-core development machine: wide margins for a busy CPU.
    assert mean_seconds < 1.0 and bleu_seconds < 5.0


# --- From cell records -------------------------------------------------------------------------


def cell(
    method: str,
    seed: int,
    preds: list[str],
    nll: list[float] | None,
    rate: float = 0.5,
    settings: MetricSettings | None = None,
) -> dict[str, Any]:
    metrics, per_row = evaluate_rows(
        preds, REFS, settings or MetricSettings(bootstrap=50, bleu_bootstrap=10), nll=nll
    )
    return {
        "name": f"{method}_p{rate:g}_s{seed}",
        "method": method,
        "prune_rate": rate,
        "seed": seed,
        "token_keep": 1.0,
        "metrics": metrics,
        "per_row": per_row,
        "predictions": preds,
        "settings": {"metrics": {"bootstrap": 400, "bootstrap_seed": 3}},
    }


NLL = [2.0, 1.5, 1.0, 3.0, 2.5]


def bench_cells() -> dict[str, dict[str, Any]]:
    """staff (PRED_A) and random (PRED_B) with 2 seeds; ccs = random's predictions and NLL;
    a zero-shot cell that is never compared."""
    cells = {}
    for s in (0, 1):
        cells[f"staff_s{s}"] = cell("staff", s, PRED_A[s], [x - 0.25 for x in NLL])
        cells[f"random_s{s}"] = cell("random", s, PRED_B[s], NLL)
        cells[f"ccs_s{s}"] = cell("ccs", s, PRED_B[s], NLL)
    cells["zero-shot"] = {**cell("zero-shot", 0, PRED_B[0], NLL), "seed": None}
    return cells


def by_key(diffs: list[Any]) -> dict[tuple[str, str, str, str], Any]:
    return {(d.metric, d.method, d.baseline, d.kind): d for d in diffs}


def test_compare_cells_against_random_and_the_best_other_method() -> None:
    cells = bench_cells()
    diffs = by_key(compare_cells(cells))
    # Every metric: staff and ccs against random; each method against its best other.
    for metric in ("rougeL", "bleu4", "nll"):
        assert {k[1:] for k in diffs if k[0] == metric} == {
            ("staff", "random", VS_RANDOM),
            ("ccs", "random", VS_RANDOM),
            ("staff", "random", VS_BEST),  # random and ccs tie behind staff: first in order
            ("random", "staff", VS_BEST),
            ("ccs", "staff", VS_BEST),
        }
    # ccs made the same predictions as random: no difference at all.
    same = diffs[("bleu4", "ccs", "random", VS_RANDOM)]
    assert (same.delta, same.lo, same.hi, same.p) == (0.0, 0.0, 0.0, 1.0)
    # staff's NLL is 0.25 lower on every row: with the models fixed a zero-width interval
    # below 0; over 2 seeds the sign-flip test cannot go below 2/2^2 = 0.5, so no verdict.
    nll = diffs[("nll", "staff", "random", VS_RANDOM)]
    assert (nll.delta, nll.lo, nll.hi) == pytest.approx((-0.25, -0.25, -0.25))
    assert nll.rows_significant and nll.p == pytest.approx(2 / 401)
    assert nll.per_seed == pytest.approx((-0.25, -0.25)) and nll.seed_p == pytest.approx(0.5)
    assert (nll.seed_lo, nll.seed_hi) == (-math.inf, math.inf)
    assert not nll.better and not nll.worse
    # Holm over the 6 comparisons with random (3 metrics × staff, ccs); ccs ties (p 1).
    assert nll.p_holm == pytest.approx(1.0)
    # BLEU: the mean over seeds of the corpus BLEU differences, and the cells' own numbers.
    bleu = diffs[("bleu4", "staff", "random", VS_RANDOM)]
    expected = np.mean(
        [
            cells[f"staff_s{s}"]["metrics"]["bleu4"] - cells[f"random_s{s}"]["metrics"]["bleu4"]
            for s in (0, 1)
        ]
    )
    assert bleu.delta == pytest.approx(expected)
    # Settings come from the cells: 400 resamples.
    assert settings_from_cells(cells).bootstrap == 400 and bleu.resamples == 400
    # Deterministic.
    assert compare_cells(cells) == compare_cells(cells)


def test_old_cells_pair_what_they_have() -> None:
    cells = bench_cells()
    for record in cells.values():  # cells from before per-row values: ROUGE-L per sample only
        record["rougeL_per_sample"] = record.pop("per_row")["rougeL"]
        record["metrics"].pop("nll")
    diffs = compare_cells(cells)
    assert {d.metric for d in diffs} == {"rougeL"}
    assert row_values(cells["staff_s0"]).keys() == {"rougeL"}
    # With the evaluation references, BLEU statistics are recomputed from the predictions.
    with_refs = compare_cells(cells, references=REFS)
    assert {d.metric for d in with_refs} == {"rougeL", "bleu4"}
    new = by_key(compare_cells(bench_cells()))
    old = by_key(with_refs)
    key = ("bleu4", "staff", "random", VS_RANDOM)
    assert old[key] == new[key]


def test_only_seeds_both_methods_ran_are_paired() -> None:
    cells = bench_cells()
    del cells["random_s1"]
    diffs = by_key(compare_cells(cells))
    d = diffs[("rougeL", "staff", "random", VS_RANDOM)]
    assert d.n_seeds == 1 and d.seed_std is None
    staff, rand = cells["staff_s0"], cells["random_s0"]
    expected = np.mean(np.subtract(staff["per_row"]["rougeL"], rand["per_row"]["rougeL"]))
    assert d.delta == pytest.approx(expected)


def test_a_variant_is_compared_with_the_method_it_varies() -> None:
    cells = bench_cells()
    for s in (0, 1):  # another small model: random's predictions, NLL 0.5 lower than random
        cells[f"derived_s{s}"] = cell("staff-derived", s, PRED_B[s], [x - 0.5 for x in NLL])
    bases = {"staff-derived": "staff", "ccs": "random"}
    diffs = by_key(compare_cells(cells, bases=bases))
    nll = diffs[("nll", "staff-derived", "staff", VS_BASE)]
    # NLL − 0.5 against staff's − 0.25, on every row: −0.25 with a zero-width row interval,
    # but two seeds cannot carry a verdict.
    assert (nll.delta, nll.lo, nll.hi) == pytest.approx((-0.25, -0.25, -0.25))
    assert nll.rows_significant and not nll.better
    # Same predictions as random: the ROUGE-L difference is random − staff.
    rouge = diffs[("rougeL", "staff-derived", "staff", VS_BASE)]
    staff = diffs[("rougeL", "staff", "random", VS_RANDOM)]
    assert rouge.delta == pytest.approx(-staff.delta)
    # A variant of random is compared with random once (as against random); none without bases.
    assert not any(k[1] == "ccs" and k[3] == VS_BASE for k in diffs)
    assert not any(k[3] == VS_BASE for k in by_key(compare_cells(cells)))

    table = variant_table(list(diffs.values()))
    prefix = "| staff-derived − staff | reference NLL | 0.5 |"
    (line,) = [x for x in table.splitlines() if x.startswith(prefix)]
    assert line.startswith(prefix + " -0.250 ± 0.000 [−∞, +∞], p-value 0.5")
    assert "| -0.250, -0.250 | [-0.250, -0.250], p-value 0.005 |" in line and "▲" not in line
    rows = [{"method": "staff", "prune_rate": 0.5, "seed": 0, "rougeL": 1.0}]
    assert "## Variants vs their method" in render_tables(rows, comparisons=list(diffs.values()))
    assert variant_table(compare_cells(cells)) == ""


def test_paired_csv_round_trip(tmp_path: Path) -> None:
    diffs = compare_cells(bench_cells())
    path = tmp_path / "paired.csv"
    write_paired_csv(path, diffs)
    assert read_paired_csv(path) == diffs


# --- Reference NLL -----------------------------------------------------------------------------


def direct_nll(model: Any, data: TokenizedData) -> list[float]:
    """Row by row, no padding: cross-entropy of each response token given everything before."""
    out = []
    with torch.no_grad():
        for ids, labels in zip(data.input_ids, data.labels, strict=True):
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            targets = torch.tensor(labels[1:])
            counted = targets != IGNORE_INDEX
            ce = F.cross_entropy(logits[:-1][counted], targets[counted])
            out.append(float(ce))
    return out


def test_reference_nll_against_a_direct_computation() -> None:
    model = tiny_causal_lm(61, seed=4)
    data = mixed_prompt_data(61, seed=1)
    # Token masks (token-level selection) must not change the metric: every response token counts.
    data.token_masks = [[i % 2 for i in range(len(x))] for x in data.input_ids]
    got = reference_nll_rows(model, data, max_batch_tokens=48)  # batches with padding
    assert got.dtype == np.float64 and got.shape == (len(data),)
    # Padded batches against one row at a time: other float32 sums in every forward pass (rows of
    # up to 24 tokens).
    assert got == pytest.approx(
        direct_nll(model, data), rel=tol(torch.float32, forward_terms(model, 24))
    )
    # ... and into a cell's metrics and per-row values.
    preds = [REFS[i % 5][0] for i in range(len(data))]
    refs = [REFS[i % 5] for i in range(len(data))]
    metrics, per_row = evaluate_rows(preds, refs, MetricSettings(bootstrap=50), nll=got)
    assert metrics["nll"] == pytest.approx(float(got.mean()))
    assert metrics["nll_lo"] <= metrics["nll"] <= metrics["nll_hi"]
    assert metrics["n_nll"] == len(data) and per_row["nll"] == got.tolist()
    assert per_row["bleu4_stats"] == bleu_statistics(preds, refs).tolist()
