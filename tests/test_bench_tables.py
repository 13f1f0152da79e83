"""Bench reports: Table-1/Table-2 rendering from a fixed results.csv (mean ± std, bold best,
underlined second, intervals), with a fixed paired.csv (bold only when significant, tied
leaders, the "Δ vs random" blocks and the verdict), the CSV round trip, the Rand index and the
plots."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from speccore.bench.paired import PairedDiff, read_paired_csv
from speccore.bench.plots import write_plots
from speccore.bench.tables import (
    columns_for,
    compute_line,
    delta_table,
    metric_table,
    overhead_table,
    rank_marks,
    read_results_csv,
    render_tables,
    stage_column,
    stage_label,
    verdict,
    write_results_csv,
)
from speccore.selection.agreement import rand_index

RESULTS = """\
method,prune_rate,seed,coreset_size,n_train,n_eval,rougeL,rougeL_lo,rougeL_hi,bleu4,bleu4_lo,bleu4_hi,select_s,sel_small_fine-tune_s,sel_target_verification_s,train_s,eval_s,agreement,rand_index
zero-shot,0,,0,100,10,10,8,12,1,0.5,1.5,,,,,5,,
full,0,0,100,100,10,40,38,42,15,13,17,,,,100,5,,
full,0,1,100,100,10,42,40,44,17,15,19,,,,100,5,,
staff,0.5,0,50,100,10,32,30,34,12,10,14,60,40,15,50,5,0.8,0.7
staff,0.5,1,50,100,10,34,32,36,14,12,16,10,,5,50,5,0.6,0.5
random,0.5,0,50,100,10,31,29,33,11,9,13,0.1,,,50,5,,
random,0.5,1,50,100,10,31,29,33,11,9,13,0.1,,,50,5,,
el2n,0.5,0,50,100,10,20,18,22,5,4,6,200,,,50,5,,
el2n,0.5,1,50,100,10,22,20,24,6,5,7,30,,,50,5,,
staff,0.9,0,10,100,10,25,23,27,8,7,9,12,,5,10,5,0.8,0.7
staff,0.9,1,10,100,10,27,25,29,9,8,10,11,,5,10,5,0.6,0.5
random,0.9,0,10,100,10,20,18,22,7,6,8,0.1,,,10,5,,
random,0.9,1,10,100,10,24,22,26,7,6,8,0.1,,,10,5,,
el2n,0.9,0,10,100,10,26,24,28,9,8,10,30,,,10,5,,
el2n,0.9,1,10,100,10,26,24,28,9,8,10,30,,,10,5,,
"""


# Paired comparisons for RESULTS (as paired.py writes them; 8 seeds, although RESULTS shows two:
# the tables read the comparisons as they are). lo/hi/p: the row bootstrap with the models
# fixed; seed_lo/seed_hi/seed_p: the seed-level test, p_holm its Holm-adjusted p-value, which
# the marks follow. ROUGE-L: at p = 0.5 staff is significantly ahead of random (the runner-up),
# el2n significantly behind; at p = 0.9 staff and el2n (tied at 26 by mean) are not apart,
# random is behind staff; el2n − random at p = 0.9 clears 0.05 before Holm (0.03) but not
# after (0.12), while its row interval excludes 0. BLEU-4: only p = 0.5 was paired, and
# nothing there is significant.
PAIRED = """\
metric,prune_rate,method,baseline,kind,delta,lo,hi,p,seed_std,n_seeds,n_rows,resamples,confidence,per_seed,seed_lo,seed_hi,seed_p,p_holm
rougeL,0.5,staff,random,random,2.0,0.8,3.1,0.004,1.0,8,10,1000,0.95,1 2 3 2 1 3 2 2,1.0,3.0,0.0078125,0.0390625
rougeL,0.5,el2n,random,random,-10.0,-12.0,-8.0,0.0002,1.4,8,10,1000,0.95,,-11.5,-8.5,0.0078125,0.046875
rougeL,0.5,staff,random,best_other,2.0,0.8,3.1,0.004,1.0,8,10,1000,0.95,,1.0,3.0,0.0078125,0.03125
rougeL,0.5,random,staff,best_other,-2.0,-3.1,-0.8,0.004,1.0,8,10,1000,0.95,,-3.0,-1.0,0.0078125,0.03125
rougeL,0.5,el2n,staff,best_other,-12.0,-14.0,-10.0,0.0002,1.4,8,10,1000,0.95,,-13.0,-11.0,0.0078125,0.03125
rougeL,0.9,staff,random,random,4.0,-0.5,8.0,0.08,0.0,8,10,1000,0.95,,-1.0,9.0,0.08,0.24
rougeL,0.9,el2n,random,random,4.0,0.5,7.5,0.03,2.8,8,10,1000,0.95,,0.25,7.75,0.03,0.12
rougeL,0.9,staff,el2n,best_other,0.0,-1.5,1.5,1.0,1.4,8,10,1000,0.95,,-2.0,2.0,1.0,1.0
rougeL,0.9,random,staff,best_other,-4.0,-6.0,-2.0,0.001,0.0,8,10,1000,0.95,,-7.0,-1.0,0.0078125,0.03125
rougeL,0.9,el2n,staff,best_other,0.0,-1.5,1.5,1.0,1.4,8,10,1000,0.95,,-2.0,2.0,1.0,1.0
bleu4,0.5,staff,random,random,2.0,-0.4,4.5,0.11,1.4,8,10,1000,0.95,,-1.0,5.0,0.2,0.6
bleu4,0.5,staff,random,best_other,2.0,-0.4,4.5,0.11,1.4,8,10,1000,0.95,,-1.0,5.0,0.2,1.0
bleu4,0.5,el2n,random,random,-5.5,-9.0,0.5,0.07,0.7,8,10,1000,0.95,,-inf,0.5,0.3,0.6
"""


@pytest.fixture
def rows(tmp_path: Path) -> list[dict[str, object]]:
    path = tmp_path / "results.csv"
    path.write_text(RESULTS, encoding="utf-8")
    return read_results_csv(path)


@pytest.fixture
def paired(tmp_path: Path) -> list[PairedDiff]:
    path = tmp_path / "paired.csv"
    path.write_text(PAIRED, encoding="utf-8")
    return read_paired_csv(path)


def line_of(table: str, label: str) -> str:
    (line,) = [x for x in table.splitlines() if x.startswith(f"| {label} |")]
    return line


def test_rouge_table_marks_best_bold_and_second_underlined(rows: list[dict[str, object]]) -> None:
    table = metric_table(rows, "rougeL")
    assert table.splitlines()[0] == "| method | reference | p = 0.5 | p = 0.9 |"
    # p = 0.5: staff 33 ± 1.41 best, random 31 ± 0 second; p = 0.9: staff and el2n tie at 26.
    assert line_of(table, "staff") == (
        "| staff |  | **33.00 ± 1.41** [31.0, 35.0] | **26.00 ± 1.41** [24.0, 28.0] |"
    )
    assert line_of(table, "random") == (
        "| random |  | <u>31.00 ± 0.00</u> [29.0, 33.0] | <u>22.00 ± 2.83</u> [20.0, 24.0] |"
    )
    assert line_of(table, "el2n") == (
        "| el2n |  | 21.00 ± 1.41 [19.0, 23.0] | **26.00 ± 0.00** [24.0, 28.0] |"
    )
    # Reference rows: their value in the reference column, never ranked.
    assert (
        line_of(table, "full data (p = 0)")
        == "| full data (p = 0) | 41.00 ± 1.41 [39.0, 43.0] |  |  |"
    )
    assert line_of(table, "zero-shot (no fine-tuning)").startswith(
        "| zero-shot (no fine-tuning) | 10.00 [8.0, 12.0] |"
    )
    assert "mean ± std over 2 seeds" in table
    assert "by mean (not tested: no paired comparisons)" in table


def test_best_is_bold_only_when_significantly_ahead_of_the_second(
    rows: list[dict[str, object]], paired: list[PairedDiff]
) -> None:
    table = metric_table(rows, "rougeL", paired)
    # p = 0.5: staff significantly ahead of random over seeds: bold and underlined. p = 0.9:
    # staff and el2n tie (Holm p 1): nobody bold.
    assert line_of(table, "staff") == (
        "| staff |  | **33.00 ± 1.41** [31.0, 35.0] | 26.00 ± 1.41 [24.0, 28.0] |"
    )
    assert line_of(table, "random") == (
        "| random |  | <u>31.00 ± 0.00</u> [29.0, 33.0] | 22.00 ± 2.83 [20.0, 24.0] |"
    )
    assert (
        line_of(table, "el2n")
        == "| el2n |  | 21.00 ± 1.41 [19.0, 23.0] | 26.00 ± 0.00 [24.0, 28.0] |"
    )
    assert (
        "- p = 0.5: **staff** significantly ahead of random: +2.00 [+1.00, +3.00], "
        "p-value 0.008 (Holm 0.039)." in table
    )
    # random is significantly behind staff: not among the tied leaders.
    assert (
        "- p = 0.9: leaders tied (staff, el2n); staff − el2n: +0.00 [-2.00, +2.00], p-value 1."
        in table
    )
    # BLEU-4: at p = 0.5 staff (13) leads random (11) without a significant gap; at p = 0.9
    # el2n leads staff but the pair was never tested.
    bleu = metric_table(rows, "bleu4", paired)
    assert "**" not in bleu.split("\n\n")[0]
    assert "- p = 0.5: leaders tied (staff, random); staff − random: +2.00 [-1.00, +5.00]" in bleu
    assert "- p = 0.9: leaders el2n, staff not tested (no paired per-row values)." in bleu


def test_delta_blocks_mark_only_what_clears_holm_over_seeds(
    rows: list[dict[str, object]], paired: list[PairedDiff]
) -> None:
    table = delta_table(rows, paired, "rougeL")
    assert table.splitlines()[0] == (
        "| method − random | p | Δ [95% over seeds], p-value (Holm) | per-seed Δ "
        "| models fixed: [95% over rows], p-value |"
    )
    lines = [x for x in table.splitlines() if x.startswith("| staff |")]
    assert lines == [
        "| staff | 0.5 | +2.00 ± 1.00 [+1.00, +3.00], p-value 0.008 (Holm 0.039) ▲ "
        "| +1.00, +2.00, +3.00, +2.00, +1.00, +3.00, +2.00, +2.00 "
        "| [+0.80, +3.10], p-value 0.004 |",
        "| staff | 0.9 | +4.00 ± 0.00 [-1.00, +9.00], p-value 0.08 (Holm 0.24) | — "
        "| [-0.50, +8.00], p-value 0.08 |",
    ]
    el2n = [x for x in table.splitlines() if x.startswith("| el2n |")]
    assert el2n[0].startswith("| el2n | 0.5 | -10.00 ± 1.40 [-11.50, -8.50], p-value 0.008")
    assert el2n[0].split(" | ")[2].endswith("▼")
    # Significant before Holm and on the rows with the models fixed, not after Holm: no mark.
    assert "▲" not in el2n[1] and "▼" not in el2n[1]
    assert "| [+0.50, +7.50], p-value 0.03 |" in el2n[1]
    assert "| random |" not in table
    assert "Holm-adjusted over the 6 comparisons of this table" in table
    assert "1000 resamples of the 10 evaluation rows" in table
    # An interval the seeds cannot close shows its infinite end.
    bleu = delta_table(rows, paired, "bleu4")
    assert "| el2n | 0.5 | -5.50 ± 0.70 [−∞, +0.50], p-value 0.3 (Holm 0.6) | — |" in bleu


def test_verdict_says_who_beats_random_where_over_seeds(
    rows: list[dict[str, object]], paired: list[PairedDiff]
) -> None:
    text = verdict(rows, paired)
    assert text.startswith(
        "Tested over training seeds (8 seeds; 10 evaluation rows held fixed): an exact "
        "sign-flip test on each comparison's per-seed differences, Holm-corrected at 0.05 over "
        "the 6 comparisons with random and of variants with their method. Seeds vary the "
        "target's fine-tune"
    )
    assert "(`selection_seeds: shared`)" in text
    assert text.endswith(
        "At p = 0.5, staff beats random on ROUGE-L (+2.00 [+1.00, +3.00], p-value 0.008 (Holm "
        "0.039)); el2n is worse than random on ROUGE-L (-10.00 [-11.50, -8.50], p-value 0.008 "
        "(Holm 0.047)). At p = 0.9, no method differs significantly from random. Every other "
        "difference is within seed-to-seed noise."
    )
    assert "selection_seeds: per_seed" in verdict(rows, paired, "per_seed")
    nothing = [d for d in paired if d.metric == "bleu4"]
    assert "At p = 0.5, no method differs significantly from random." in verdict(rows, nothing)
    assert verdict(rows, []).startswith("No paired comparison with random")
    assert verdict(rows, None).startswith("No paired comparisons")
    md = render_tables(rows, "T", paired)
    assert md.index("## Verdict") < md.index("## ROUGE-L") < md.index("### Δ vs random: ROUGE-L")
    assert md.index("### Δ vs random: ROUGE-L") < md.index("## BLEU-4")
    # No cell has a reference NLL (a results.csv from before it): the section says so.
    assert "## Reference NLL (nats/token, lower is better)\n\n_No cell has a reference NLL" in md


def test_too_few_seeds_mark_nothing_and_the_verdict_says_so(
    rows: list[dict[str, object]], paired: list[PairedDiff]
) -> None:
    """The same comparisons from 3 seeds: 2/2^3 = 0.25 is the smallest p the test can give,
    Holm's first step over 6 comparisons needs 0.05/6; 1 + log2(6/0.05) = 7.9, so 8 seeds."""
    three = [dataclasses.replace(d, n_seeds=3) for d in paired]
    text = verdict(rows, three)
    assert "**Too few seeds for a verdict**: with 3 seeds the smallest p-value" in text
    assert "is 0.25 (2/2^3)" in text and "takes at least 8 seeds" in text
    assert "beats" not in text and "worse than" not in text


def test_reference_nll_ranks_lower_first_and_missing_values_show_a_dash(
    rows: list[dict[str, object]], tmp_path: Path
) -> None:
    with_nll = [dict(r) for r in rows]
    for r in with_nll:  # NLL only for the p = 0.5 cells, as if p = 0.9 ran before it existed
        if r["prune_rate"] == 0.5:
            r.update(nll=2.0 - float(r["rougeL"]) / 100, nll_lo=1.5, nll_hi=2.5, n_nll=20)
    table = metric_table(with_nll, "nll")
    # staff has the highest ROUGE-L, so the lowest NLL: best.
    assert line_of(table, "staff") == "| staff |  | **1.670 ± 0.014** [1.500, 2.500] | — |"
    assert line_of(table, "el2n") == "| el2n |  | 1.790 ± 0.014 [1.500, 2.500] | — |"
    assert rank_marks({"a": 1.2, "b": 1.1, "c": 1.3}, 2, higher_is_better=False) == {
        "b": "best",
        "a": "second",
    }
    columns = columns_for(with_nll)
    assert columns[columns.index("bleu4_hi") + 1 : columns.index("bleu4_hi") + 5] == [
        "nll",
        "nll_lo",
        "nll_hi",
        "n_nll",
    ]
    assert "nll" not in columns_for(rows)
    out = tmp_path / "nll.csv"
    write_results_csv(out, with_nll)
    again = read_results_csv(out)
    assert [r.get("nll") for r in again] == [r.get("nll") for r in with_nll]


def test_bleu_block_ranks_its_own_metric(rows: list[dict[str, object]]) -> None:
    table = metric_table(rows, "bleu4")
    # p = 0.9: el2n 9.00 best, staff 8.50 second.
    assert "| el2n |  | 5.50 ± 0.71 [4.5, 6.5] | **9.00 ± 0.00** [8.0, 10.0] |" in table
    assert "<u>8.50 ± 0.71</u>" in line_of(table, "staff")


def test_rank_marks_ties_and_missing_values() -> None:
    assert rank_marks({"a": 1.0, "b": 3.0, "c": 3.001, "d": None}) == {
        "b": "best",
        "c": "best",
        "a": "second",
    }
    assert rank_marks({"a": 2.0}) == {"a": "best"}


def test_overhead_table_shows_each_methods_costliest_selection(
    rows: list[dict[str, object]],
) -> None:
    table = overhead_table(rows)
    header = table.splitlines()[0]
    assert header == (
        "| method | small fine-tune | target verification | selection total | coreset fine-tune "
        "| reference NLL | generation |"
    )
    # staff's costliest cell (seed 0, p = 0.5) paid the small fine-tune; mean fine-tune 30 s.
    # These rows predate nll_s: their reference NLL time is unknown (—), not 0.
    assert line_of(table, "staff") == "| staff | 40.0 | 15.0 | 60.0 | 30.0 | — | 5.0 |"
    assert line_of(table, "el2n") == "| el2n | — | — | 200.0 | 30.0 | — | 5.0 |"
    assert line_of(table, "zero-shot (no fine-tuning)") == (
        "| zero-shot (no fine-tuning) | — | — | — | — | — | 5.0 |"
    )


def test_reference_nll_time_is_its_own_column_and_counted_in_the_compute(
    rows: list[dict[str, object]], tmp_path: Path
) -> None:
    """A cell times its reference NLL apart from generation (``nll_seconds``): the overhead
    table and the compute line must show it, and results.csv keep it after ``train_s``."""
    timed = [{**r, "nll_s": 7.0} for r in rows]
    table = overhead_table(timed)
    assert line_of(table, "staff") == "| staff | 40.0 | 15.0 | 60.0 | 30.0 | 7.0 | 5.0 |"
    # 383.4 + 560 + 15 × 7 + 15 × 5, summed by hand.
    assert compute_line(timed) == (
        "_Compute: 15 cells, selection 383 s + fine-tune 560 s + reference NLL 105 s + "
        "generation 75 s = 1123 s (18.7 min); model loads and tokenisation not included._"
    )
    out = tmp_path / "timed.csv"
    write_results_csv(out, timed)
    header = out.read_text().splitlines()[0].split(",")
    assert header[header.index("train_s") + 1] == "nll_s"
    assert read_results_csv(out) == timed


def test_full_markdown_has_both_metrics_agreement_and_overhead(
    rows: list[dict[str, object]],
) -> None:
    md = render_tables(rows, title="T")
    for heading in (
        "## ROUGE-L",
        "## BLEU-4",
        "## Small/target agreement",
        "## Selection overhead",
    ):
        assert heading in md
    assert "| staff | 0.5 | 0.700 | 0.600 | 2 |" in md
    # 383.4 s of selection + 560 s of fine-tuning + 15 × 5 s of evaluation, summed by hand.
    assert md.rstrip().endswith(
        "_Compute: 15 cells, selection 383 s + fine-tune 560 s + reference NLL 0 s + "
        "generation 75 s = 1018 s (17.0 min); model loads and tokenisation not included._"
    )


def test_results_csv_round_trip(rows: list[dict[str, object]], tmp_path: Path) -> None:
    out = tmp_path / "again.csv"
    write_results_csv(out, rows)
    assert read_results_csv(out) == rows
    assert stage_column("small fine-tune") == "sel_small_fine-tune_s"
    assert stage_label(stage_column("target verification")) == "target verification"
    assert stage_label(stage_column("small fine-tune + scoring")) == "small fine-tune plus scoring"


def test_rand_index_of_equal_width_regions() -> None:
    assert rand_index([0.0, 0.1, 0.9, 1.0], [5.0, 6.0, 50.0, 60.0], regions=2) == 1.0
    # regions [0, 0, 1, 1] vs [0, 1, 0, 1]: 2 of the 6 pairs agree.
    assert rand_index([0.0, 0.1, 0.9, 1.0], [0.0, 1.0, 0.1, 0.9], regions=2) == pytest.approx(1 / 3)


def test_plots_are_written(rows: list[dict[str, object]], tmp_path: Path) -> None:
    selection = {
        "scores": [0.1, 0.5, 0.9, 1.3],
        "region_table": [
            {"region": 0, "size": 3, "budget": 1, "taken": 1, "V": 0.8},
            {"region": 1, "size": 1, "budget": 1, "taken": 1, "V": 1.2},
        ],
        "info": {
            "agreement": {"spearman": 0.4, "n": 4},
            "verified": {"indices": [0, 1, 2, 3], "target": [1.0, 3.0, 2.0, 4.0]},
        },
    }
    (tmp_path / "selections").mkdir()
    (tmp_path / "selections" / "staff_p0.5_s0.json").write_text(json.dumps(selection))
    written = {p.name for p in write_plots(tmp_path, rows)}
    assert written == {
        "rougeL_vs_prune_rate.png",
        "bleu4_vs_prune_rate.png",
        "staff_regions_p0.5.png",
        "staff_effort_small_vs_target.png",
    }
    for name in written:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_delta_plots_are_written_with_paired_comparisons(
    rows: list[dict[str, object]], paired: list[PairedDiff], tmp_path: Path
) -> None:
    written = {p.name for p in write_plots(tmp_path, rows, paired)}
    # No NLL in the rows: neither its level nor its Δ plot.
    assert written == {
        "rougeL_vs_prune_rate.png",
        "rougeL_delta_vs_random.png",
        "bleu4_vs_prune_rate.png",
        "bleu4_delta_vs_random.png",
    }
    for name in written:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
