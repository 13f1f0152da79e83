"""--dry-run: estimates with positive times and tokens per stage, and nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

import speccore
from conftest import tiny_select_config
from speccore import SelectConfig
from speccore.run.dryrun import dry_run, format_estimate, planned_work


def config(data: Path, dirs: dict[str, Path], **kw: object) -> SelectConfig:
    settings: dict[str, object] = dict(
        small_epochs=2,
        target_epochs=1,
        max_batch_tokens=128,
        dry_run=True,
        group_field=None,
    )
    settings.update(kw)
    return tiny_select_config(data, dirs, **settings)


def test_staff_dry_run_estimates_every_stage_and_writes_nothing(
    jsonl_data: Path, model_dirs: dict[str, Path], tmp_path: Path, isolated_cache: Path
) -> None:
    out = tmp_path / "run"
    sel = speccore.select(config(jsonl_data, model_dirs, out=str(out)))
    assert len(sel) == 0 and not out.exists()
    assert not (isolated_cache / "scores").exists() and not (isolated_cache / "adapters").exists()
    est = sel.info["dry_run"]
    stages = {s["stage"]: s for s in est["stages"]}
    assert list(stages) == ["small fine-tune", "small scoring", "target verification"]
    for s in stages.values():
        assert s["seconds"] > 0 and 0 < s["tokens"] <= s["padded_tokens"]
    # T = 2 epochs over 24 rows; scoring sees each row once; b_v·K = 6 verified.
    assert stages["small fine-tune"]["samples"] == 48
    assert stages["small scoring"]["samples"] == 24
    assert stages["target verification"]["samples"] == 6
    assert stages["small fine-tune"]["tokens"] == 2 * stages["small scoring"]["tokens"]
    assert est["total_seconds"] >= sum(s["seconds"] for s in stages.values())
    assert est["total_tokens"] == sum(s["tokens"] for s in stages.values())
    assert est["peak_rss_bytes"] > 50 * 2**20 and set(est["load_seconds"]) == {"small", "target"}
    table = format_estimate(est)
    assert "small fine-tune" in table and "total (estimated)" in table


def test_baseline_dry_run_estimates_the_target_fine_tune(
    jsonl_data: Path, model_dirs: dict[str, Path]
) -> None:
    est = dry_run(config(jsonl_data, model_dirs, method="grand"))
    assert [s["stage"] for s in est["stages"]] == ["target fine-tune", "target scoring"]
    assert all(s["model"] == "target" and s["seconds"] > 0 for s in est["stages"])
    assert set(est["load_seconds"]) == {"target"}  # the small model is never loaded


@pytest.mark.parametrize(
    ("settings", "stages"),
    [
        ({"method": "random"}, []),
        ({"verification": False, "small_adapter": "a"}, ["small scoring"]),
        ({"scores": "s.npy"}, ["target verification"]),
        ({"method": "d2"}, ["target fine-tune", "target scoring", "target embeddings"]),
    ],
)
def test_planned_work_follows_the_method_and_flags(
    settings: dict[str, object], stages: list[str]
) -> None:
    cfg = SelectConfig.from_dict(dict(data="x", **settings))
    assert [w.stage for w in planned_work(cfg, 100)] == stages
