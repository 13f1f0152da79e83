"""Bench reports: Table-1/Table-2 rendering from a fixed results.csv (mean ± std, bold best,
underlined second, intervals), the CSV round trip, the Rand index and the plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from speccore.bench.plots import write_plots
from speccore.bench.run import rand_index
from speccore.bench.tables import (
    metric_table,
    overhead_table,
    rank_marks,
    read_results_csv,
    render_tables,
    stage_column,
    stage_label,
    write_results_csv,
)

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


@pytest.fixture
def rows(tmp_path: Path) -> list[dict[str, object]]:
    path = tmp_path / "results.csv"
    path.write_text(RESULTS, encoding="utf-8")
    return read_results_csv(path)


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
        "| evaluation |"
    )
    # staff's costliest cell (seed 0, p = 0.5) paid the small fine-tune; mean fine-tune 30 s.
    assert line_of(table, "staff") == "| staff | 40.0 | 15.0 | 60.0 | 30.0 | 5.0 |"
    assert line_of(table, "el2n") == "| el2n | — | — | 200.0 | 30.0 | 5.0 |"
    assert line_of(table, "zero-shot (no fine-tuning)") == (
        "| zero-shot (no fine-tuning) | — | — | — | — | 5.0 |"
    )


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
    assert "| 0.5 | 0.700 | 0.600 | 2 |" in md
    # 383.4 s of selection + 560 s of fine-tuning + 15 × 5 s of evaluation, summed by hand.
    assert md.rstrip().endswith(
        "_Compute: 15 cells, selection 383 s + fine-tune 560 s + evaluation 75 s = 1018 s "
        "(17.0 min); model loads and tokenisation not included._"
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
