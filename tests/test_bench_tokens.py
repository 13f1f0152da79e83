"""``token_keep`` as a bench dimension, on tiny random models: token cells train with their
masks (prompt and EOS kept, some response tokens dropped), token_keep 1.0 is the sample-level
path bit for bit, tables show ``staff`` and ``staff +tok0.6`` side by side, and adding a
token_keep to a finished bench runs only the new cells."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import speccore.train
from conftest import micro_bench_settings
from speccore.bench import bench_config_from_dict, plan_cells, read_results_csv, run_bench
from speccore.bench.report import cell_row
from speccore.bench.tables import metric_table, row_label
from speccore.data import collate
from speccore.data.batches import IGNORE_INDEX, TokenizedData
from speccore.tokens import load_token_masks
from speccore.utils.errors import ConfigError

TARGET_TUNE = "fine-tune target ("


@pytest.fixture
def settings(tmp_path: Path, model_dirs: dict[str, Path]) -> dict[str, Any]:
    """A micro STAFF bench: 12 training rows, 3 evaluation rows, one rate, one seed."""
    return micro_bench_settings(
        tmp_path,
        model_dirs,
        eval_rows=3,
        methods=["staff", "random"],
        full=False,
        zero_shot=False,
        generation={"max_new_tokens": 4, "batch_size": 3},
        metrics={"bootstrap": 20, "bleu_bootstrap": 5},
    )


@pytest.fixture
def target_tunes(monkeypatch: pytest.MonkeyPatch) -> dict[str, TokenizedData]:
    """The data of every target fine-tune of a bench cell, by cell name (other fine-tunes,
    e.g. the cross-fitted small adapters, pass through unrecorded)."""
    seen: dict[str, TokenizedData] = {}
    real = speccore.train.finetune

    def spy(model: Any, data: TokenizedData, *args: Any, **kwargs: Any) -> dict[str, float]:
        desc = str(kwargs.get("desc", ""))
        if desc.startswith(TARGET_TUNE):
            seen[desc[len(TARGET_TUNE) : -1]] = data
        return real(model, data, *args, **kwargs)

    monkeypatch.setattr(speccore.train, "finetune", spy)
    return seen


def cell(folder: Path, name: str) -> dict[str, Any]:
    return json.loads((folder / "cells" / f"{name}.json").read_text(encoding="utf-8"))


def test_token_cells_train_with_masks_and_resume_adds_only_them(
    settings: dict[str, Any], target_tunes: dict[str, TokenizedData], tmp_path: Path
) -> None:
    # A bench from before token selection: sample-level cells, no masks.
    first = run_bench(bench_config_from_dict(settings), plots=False)
    assert first.ran == ["staff_p0.5_s0", "random_p0.5_s0"]
    assert all(target_tunes[n].token_masks is None for n in first.ran)
    folder = Path(settings["out"])
    staff_file = (folder / "cells" / "staff_p0.5_s0.json").read_bytes()

    # Adding token_keep 0.6 runs the one new cell; the finished ones stay as they are.
    settings["token_keeps"] = [1.0, 0.6]
    settings["select"]["token_rank"] = "sample"  # a default written out changes nothing
    again = run_bench(bench_config_from_dict(settings), plots=True)
    assert again.ran == ["staff_p0.5_s0_tok0.6"]
    assert again.skipped == ["staff_p0.5_s0", "random_p0.5_s0"]
    assert (folder / "cells" / "staff_p0.5_s0.json").read_bytes() == staff_file

    # The token cell trained on the same rows, with masks: every prompt position and the EOS
    # kept, some response tokens dropped (and only response tokens).
    plain, masked = target_tunes["staff_p0.5_s0"], target_tunes["staff_p0.5_s0_tok0.6"]
    assert masked.input_ids == plain.input_ids and masked.labels == plain.labels
    assert masked.token_masks is not None
    kept = dropped = 0
    for labels, mask in zip(masked.labels, masked.token_masks, strict=True):
        response = [p for p, t in enumerate(labels) if t != IGNORE_INDEX]
        assert all(mask[p] == 1 for p in range(len(labels)) if p not in response)
        assert mask[response[-1]] == 1  # EOS
        kept += sum(mask[p] for p in response)
        dropped += sum(1 - mask[p] for p in response)
    assert dropped > 0 and kept > dropped
    batch = collate(masked, range(len(masked)))
    n_labels = int((batch["labels"] != IGNORE_INDEX).sum())
    assert n_labels == kept  # the collator turned exactly the dropped tokens into -100

    # The cell records its token_keep and the fraction of response tokens it trained on.
    token_cell = cell(folder, "staff_p0.5_s0_tok0.6")
    assert token_cell["token_keep"] == 0.6
    assert token_cell["kept_token_fraction"] == pytest.approx(kept / (kept + dropped))
    assert token_cell["tokens"]["crossfit"] is True
    assert token_cell["selection"]["timings"]["token scoring"] > 0
    sel_a = json.loads((folder / "selections" / "staff_p0.5_s0.json").read_text())
    sel_b = json.loads((folder / "selections" / "staff_p0.5_s0_tok0.6.json").read_text())
    assert sel_a["indices"] == sel_b["indices"]  # the same coreset, from the cache
    indices, masks = load_token_masks(
        folder / "selections" / "staff_p0.5_s0_tok0.6_tokens" / "token_masks.npz"
    )
    assert indices.tolist() == sel_b["indices"] and masks == masked.token_masks

    # results.csv: both STAFF rows; table.md: `staff` and `staff +tok0.6` in the p = 0.5 column.
    rows = read_results_csv(folder / "results.csv")
    assert [(r["method"], r["token_keep"]) for r in rows] == [
        ("staff", 1.0),
        ("staff", 0.6),
        ("random", 1.0),
    ]
    assert rows[0]["kept_token_fraction"] == 1.0
    assert rows[1]["kept_token_fraction"] == pytest.approx(kept / (kept + dropped), abs=1e-6)
    table = (folder / "table.md").read_text(encoding="utf-8")
    labels = [line.split(" | ")[0][2:] for line in table.splitlines() if line.startswith("| ")]
    assert labels[:5] == ["method", "---", "staff", "staff +tok0.6", "random"]
    assert "| p = 0.5 |" in table
    agreement = table.split("## Small/target agreement")[1].split("##")[0]
    (line,) = [x for x in agreement.splitlines() if x.startswith("| staff | 0.5 |")]
    assert line.endswith("| 1 |")  # the token cell repeats its seed's selection: counted once
    assert (folder / "rougeL_vs_prune_rate.png").read_bytes()[:4] == b"\x89PNG"

    # Other token settings do not mix into the finished token cell.
    settings["select"]["token_rank"] = "global"
    with pytest.raises(
        ConfigError, match=r"token cell staff_p0\.5_s0_tok0\.6 .*select\.token_rank"
    ):
        run_bench(bench_config_from_dict(settings), plots=False)


def test_token_keep_one_is_the_sample_level_path_bit_for_bit(
    settings: dict[str, Any], target_tunes: dict[str, TokenizedData], tmp_path: Path
) -> None:
    settings["methods"] = ["staff"]
    plain = run_bench(bench_config_from_dict(settings), plots=False)
    assert plain.ran == ["staff_p0.5_s0"]
    # The token cell first: it fills the cache and moves every RNG before the 1.0 cell runs.
    settings["token_keeps"] = [0.6, 1.0]
    settings["out"] = str(tmp_path / "b" / "bench")
    both = run_bench(bench_config_from_dict(settings), plots=False)
    assert both.ran == ["staff_p0.5_s0_tok0.6", "staff_p0.5_s0"]
    a = cell(Path(plain.folder), "staff_p0.5_s0")
    b = cell(Path(both.folder), "staff_p0.5_s0")
    assert losses(a) == losses(b) and a["predictions"] == b["predictions"]
    assert a["metrics"] == b["metrics"] and b["kept_token_fraction"] == 1.0
    assert target_tunes["staff_p0.5_s0"].token_masks is None
    # Same coreset, other training signal: the token cell's losses differ.
    token_cell = cell(Path(both.folder), "staff_p0.5_s0_tok0.6")
    assert token_cell["coreset_size"] == a["coreset_size"] and losses(token_cell) != losses(a)


def losses(record: dict[str, Any]) -> dict[str, float]:
    """A cell's fine-tune statistics without its timings."""
    return {k: v for k, v in record["train"].items() if k not in ("seconds", "tokens_per_s")}


def test_plan_names_and_labels(settings: dict[str, Any]) -> None:
    settings.update(token_keeps=[1.0, 0.6, 0.3], prune_rates=[0.5, 0.9], full=True)
    names = [c.name for c in plan_cells(bench_config_from_dict(settings))]
    assert names == [
        "full_s0",
        "staff_p0.5_s0",
        "staff_p0.5_s0_tok0.6",
        "staff_p0.5_s0_tok0.3",
        "random_p0.5_s0",
        "staff_p0.9_s0",
        "staff_p0.9_s0_tok0.6",
        "staff_p0.9_s0_tok0.3",
        "random_p0.9_s0",
    ]
    assert row_label({"method": "staff", "token_keep": 0.6}) == "staff +tok0.6"
    assert row_label({"method": "staff", "token_keep": 1.0}) == "staff"
    assert row_label({"method": "staff"}) == "staff"  # a results.csv from before tokens
    # A cell file from before token selection reads as sample-level training.
    old = {
        "method": "staff",
        "prune_rate": 0.5,
        "seed": 0,
        "coreset_size": 6,
        "n_train": 12,
        "metrics": {"rougeL": 1.0},
    }
    row = cell_row(old)
    assert (row["token_keep"], row["kept_token_fraction"]) == (1.0, 1.0)
    rows = [
        {"method": "staff", "prune_rate": 0.5, "seed": 0, "token_keep": 1.0, "rougeL": 30.0},
        {"method": "staff", "prune_rate": 0.5, "seed": 0, "token_keep": 0.6, "rougeL": 32.0},
    ]
    table = metric_table(rows, "rougeL")
    assert "| staff |  | <u>30.00</u> |" in table and "| staff +tok0.6 |  | **32.00** |" in table
    assert np.isclose(float(rows[1]["token_keep"]), 0.6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"token_keeps": [0.0]}, "token_keeps must be in (0, 1]"),
        ({"token_keeps": [1.5]}, "token_keeps must be in (0, 1]"),
        ({"token_keeps": [0.6, 0.6]}, "token_keeps must not repeat a value"),
        ({"token_keeps": []}, "token_keeps must list at least one value"),
        ({"token_methods": ["staf"]}, "token_methods: unknown method 'staf'"),
        (
            {"token_keeps": [1.0, 0.6], "methods": ["random"]},
            "no method of token_methods ['staff'] is in methods ['random']",
        ),
        ({"select": {"token_keep": 0.6}}, "select.token_keep is set by the bench from token_keeps"),
        ({"select": {"token_scorer": "big"}}, "--token-scorer: invalid choice: 'big'"),
    ],
)
def test_token_config_errors_name_the_key(
    settings: dict[str, Any], change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        bench_config_from_dict({**settings, **change})
    assert message in str(err.value)


def test_token_keeps_below_one_need_the_small_model(settings: dict[str, Any]) -> None:
    settings["methods"] = ["random"]
    settings["token_methods"] = ["random"]
    settings["models"] = {"target": settings["models"]["target"]}
    bench_config_from_dict(settings)  # sample-level random needs no small model
    settings["token_keeps"] = [1.0, 0.6]
    with pytest.raises(ConfigError, match=r"models\.small is required for token_keeps below 1"):
        bench_config_from_dict(settings)
