"""speccore.select end to end on tiny random models: outputs, cache, determinism, the target's
role."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import speccore
from conftest import ModelWorkSpy, tiny_select_config
from speccore import SelectConfig
from speccore.selection import Selection


def config(data: Path, dirs: dict[str, Path], **kw: object) -> SelectConfig:
    return tiny_select_config(data, dirs, **kw)


def test_staff_end_to_end_writes_the_run(
    jsonl_data: Path, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    sel = speccore.select(config(jsonl_data, model_dirs, out=str(out)))
    assert len(sel) == 12  # ⌊24·0.5⌋, topped up to exactly m
    lines = jsonl_data.read_text(encoding="utf-8").splitlines(keepends=True)
    coreset = (out / "coreset.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    assert coreset == [lines[i] for i in sel.indices]
    saved = json.loads((out / "selection.json").read_text(encoding="utf-8"))
    assert saved["indices"] == sel.indices.tolist()
    assert len(saved["scores"]) == 24 and len(saved["regions"]) == 24
    assert {"size", "verified", "V", "budget", "taken"} <= set(saved["region_table"][0])
    assert saved["config"]["prune_rate"] == 0.5 and "torch" in saved["versions"]
    assert {"small fine-tune", "small scoring", "target verification", "total"} <= set(
        saved["timings"]
    )
    assert (out / "small_adapter" / "adapter_model.safetensors").exists()
    assert "kept 12 of 24" in (out / "summary.txt").read_text(encoding="utf-8")
    groups = saved["info"]["report"]["groups"]
    assert sum(g["kept"] for g in groups.values()) == 12
    assert Selection.load(out).indices.tolist() == sel.indices.tolist()
    kept = sel.to_dataset(speccore.load_rows(str(jsonl_data)))
    assert kept["dialogue"][0] == json.loads(lines[sel.indices[0]])["dialogue"]


def test_target_is_never_tuned_and_sees_only_verified(
    jsonl_data: Path, model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = ModelWorkSpy(monkeypatch)
    sel = speccore.select(config(jsonl_data, model_dirs))
    assert counter.finetunes == [24]  # the small model only
    assert sel.info["target_samples_scored"] == sel.info["n_verified"] <= 3 * 2
    assert counter.scored == [24, sel.info["n_verified"]]


def test_rerun_with_another_prune_rate_reuses_the_cache(
    jsonl_data: Path, model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = speccore.select(config(jsonl_data, model_dirs))
    counter = ModelWorkSpy(monkeypatch)
    second = speccore.select(config(jsonl_data, model_dirs, prune_rate=0.75))
    assert counter.finetunes == []  # adapter from cache
    assert counter.scored == []  # same verified draws: scores from cache too
    assert len(second) == 6
    np.testing.assert_array_equal(first.scores, second.scores)
    # A new seed draws other samples to verify: only those are scored.
    third = speccore.select(config(jsonl_data, model_dirs, seed=5, regions=4))
    assert counter.finetunes == []
    assert sum(counter.scored) <= third.info["n_verified"]


def test_same_seed_same_coreset_other_seed_other(
    jsonl_data: Path, model_dirs: dict[str, Path]
) -> None:
    a = speccore.select(config(jsonl_data, model_dirs, seed=1))
    b = speccore.select(config(jsonl_data, model_dirs, seed=1))
    c = speccore.select(config(jsonl_data, model_dirs, seed=2))
    assert a.indices.tolist() == b.indices.tolist()
    assert a.indices.tolist() != c.indices.tolist()


def test_other_family_warns_and_proceeds(jsonl_data: Path, model_dirs: dict[str, Path]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sel = speccore.select(config(jsonl_data, model_dirs, target=str(model_dirs["other"])))
    assert any("different tokenizers" in str(w.message) for w in caught)
    assert len(sel) == 12


def test_precomputed_scores_skip_the_small_model(
    jsonl_data: Path, model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scores = tmp_path / "scores.npy"
    np.save(scores, np.linspace(1, 2, 24))
    counter = ModelWorkSpy(monkeypatch)
    sel = speccore.select(config(jsonl_data, model_dirs, scores=str(scores), verification=False))
    assert counter.finetunes == [] and counter.scored == []
    np.testing.assert_allclose(sel.scores, np.linspace(1, 2, 24))


def test_no_verification_method_is_the_flag_and_never_asks_the_target(
    jsonl_data: Path, model_dirs: dict[str, Path]
) -> None:
    named = speccore.select(config(jsonl_data, model_dirs, method="staff-no-verification"))
    flag = speccore.select(config(jsonl_data, model_dirs, verification=False))
    staff = speccore.select(config(jsonl_data, model_dirs))
    assert named.indices.tolist() == flag.indices.tolist()
    assert named.method == "staff-no-verification"
    assert named.info["target_samples_scored"] == 0 and staff.info["target_samples_scored"] > 0
    assert all(row["verified"] == 0 for row in named.region_table)


def test_user_adapter_skips_the_fine_tune(
    jsonl_data: Path, model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    speccore.select(config(jsonl_data, model_dirs, out=str(out)))
    counter = ModelWorkSpy(monkeypatch)
    sel = speccore.select(
        config(
            jsonl_data,
            model_dirs,
            small_adapter=str(out / "small_adapter"),
            cache_dir=str(tmp_path / "c2"),
        )
    )
    assert counter.finetunes == []
    assert len(sel) == 12


def test_csv_in_csv_out(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    import csv

    from conftest import make_rows

    path = tmp_path / "train.csv"
    rows = make_rows(10)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "run"
    sel = speccore.select(config(path, model_dirs, out=str(out), prune_rate=0.6))
    with open(out / "coreset.csv", newline="", encoding="utf-8") as f:
        kept = list(csv.DictReader(f))
    assert kept == [rows[i] for i in sel.indices]


def test_baselines_share_one_target_fine_tune(
    jsonl_data: Path, model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = ModelWorkSpy(monkeypatch)
    lines = jsonl_data.read_text(encoding="utf-8").splitlines(keepends=True)
    for method in ("grand", "el2n", "ccs", "d2", "random", "staff-target-only"):
        out = tmp_path / method
        sel = speccore.select(
            config(jsonl_data, model_dirs, method=method, target_epochs=1, out=str(out))
        )
        assert len(sel) == 12, method
        coreset = (out / "coreset.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
        assert coreset == [lines[i] for i in sel.indices], method
        saved = json.loads((out / "selection.json").read_text(encoding="utf-8"))
        assert saved["method"] == method and "total" in saved["timings"]
    # grand, el2n, ccs and d2 fine-tune the target once, through the cache; no small model.
    assert counter.finetunes == [24]
