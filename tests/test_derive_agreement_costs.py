"""Cost ratios of small models (speccore.proxies.costs): each row looks up the right side-by-side
timing."""

from __future__ import annotations

from speccore.proxies.costs import cost_table, measured_cost_ratio

COSTS = {
    ("ui", "gemma-3-270m", 18): {"finetune_s_per_row": 0.30, "score_s_per_row": 0.10},
    ("ui", "gemma-3-270m", 9): {"finetune_s_per_row": 0.24, "score_s_per_row": 0.08},
    ("ui", "smollm2-135m", 30): {"finetune_s_per_row": 0.15, "score_s_per_row": 0.05},
    ("ui", "smollm2-135m", 10): {"finetune_s_per_row": 0.05, "score_s_per_row": 0.03},
}


def _row(small: str, layers: str, target: str, task: str = "ui") -> dict[str, str]:
    return {"task": task, "small": small, "layers": layers, "target": target}


def test_derived_row_is_over_its_own_target() -> None:
    ratio = measured_cost_ratio(COSTS, _row("derive:0.5", "9/18", "gemma-3-270m"))
    assert ratio is not None and abs(ratio - 0.32 / 0.40) < 1e-12


def test_cross_family_row_uses_the_other_whole_model() -> None:
    ratio = measured_cost_ratio(COSTS, _row("smollm2-135m", "30/18", "gemma-3-270m"))
    assert ratio is not None and abs(ratio - 0.20 / 0.40) < 1e-12


def test_untimed_row_has_no_ratio() -> None:
    assert measured_cost_ratio(COSTS, _row("derive:0.33", "6/18", "gemma-3-270m")) is None
    assert (
        measured_cost_ratio(COSTS, _row("derive:0.5", "9/18", "gemma-3-270m", "dialogsum")) is None
    )


def test_cost_table_ratios_are_per_target() -> None:
    lines = cost_table(COSTS, 48, 32)
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| ui")]
    ratio = {(r[1].strip(), int(r[2])): float(r[5]) for r in rows}
    assert ratio == {
        ("gemma-3-270m", 18): 1.00,
        ("gemma-3-270m", 9): 0.80,
        ("smollm2-135m", 30): 1.00,
        ("smollm2-135m", 10): 0.40,
    }
