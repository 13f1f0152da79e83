"""One parser for flags, YAML files, dicts and the bench's ``select:`` mapping; cache keys built
in one place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from speccore.cli import describe_methods, main
from speccore.config import SelectConfig, parse_select_args
from speccore.utils.cache import SCORER_VERSIONS, ScoreCache, cache_key
from speccore.utils.errors import ConfigError


def test_flags_file_and_dict_give_the_same_config(tmp_path: Path) -> None:
    run = tmp_path / "run.yaml"
    run.write_text(
        "data: train.jsonl\nprune_rate: 0.8\nregions: 7\nfill: false\n"
        "lora_target_modules: [q_proj, v_proj]\nmethod: staff\n",
        encoding="utf-8",
    )
    from_file = parse_select_args([], config_file=str(run))
    from_flags = parse_select_args(
        [
            "--data",
            "train.jsonl",
            "--prune-rate",
            "0.8",
            "--regions",
            "7",
            "--no-fill",
            "--lora-target-modules",
            "q_proj,v_proj",
        ]
    )
    from_dict = SelectConfig.from_dict(
        {
            "data": "train.jsonl",
            "prune_rate": 0.8,
            "regions": 7,
            "fill": False,
            "lora_target_modules": ["q_proj", "v_proj"],
        }
    )
    assert from_file == from_flags == from_dict
    assert from_file.method_settings.regions == 7 and from_file.method_settings.fill is False
    assert from_file.lora.target_modules == ["q_proj", "v_proj"]
    # Flags win over the file.
    assert parse_select_args(["--regions", "3"], config_file=str(run)).method_settings.regions == 3


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"regions": "ten"}, "regions"),
        ({"allocation": "papr"}, "allocation"),
        ({"token_rank": "row"}, "token_rank"),
        ({"prune_rte": 0.5}, "did you mean prune_rate"),
        ({"lora_r": [1, 2]}, "lora_r"),
    ],
)
def test_a_wrong_setting_is_refused_by_the_parser(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SelectConfig.from_dict({"data": "x", **settings})


def test_bench_select_mapping_goes_through_the_same_parser(tmp_path: Path) -> None:
    from speccore.bench.bench_config import bench_config_from_dict

    raw = {
        "out": str(tmp_path / "b"),
        "data": {"train": "t.jsonl", "eval": "e.jsonl", "input_field": "a", "output_field": "b"},
        "models": {"target": "t", "small": "s"},
        "select": {"regions": "ten"},
    }
    with pytest.raises(ConfigError, match="regions"):
        bench_config_from_dict(raw)
    raw["select"] = {"verify_per_region": 3, "d2_k": 4}
    cfg = bench_config_from_dict(raw)
    sel = cfg.select_config("d2", 0.5, 0)
    assert sel.method_settings.d2_k == 4
    assert sel.settings_for("staff").verify_per_region == 3


def test_methods_lists_every_method_with_its_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == describe_methods().strip()
    for text in ("staff", "--verify-per-region = 10", "d2", "--d2-k = 5", "--ccs-beta = 0.1"):
        assert text in out


def test_cli_refuses_a_bad_choice_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["select", "--data", "x", "--score", "grad"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--score" in err[0] and "effort" in err[0]


KEY = dict(model="m", device="cpu", data="d", adapter="a")


def test_a_bf16_score_is_never_served_to_a_float32_request(tmp_path: Path) -> None:
    cache = ScoreCache(tmp_path)
    bf16 = cache_key("scores", dtype="torch.bfloat16", scorer="effort", **KEY)
    fp32 = cache_key("scores", dtype="torch.float32", scorer="effort", **KEY)
    cache.put_full(bf16, np.array([1.0, 2.0]))
    assert cache.get_full(fp32) is None
    assert cache.get_full(bf16) is not None
    cuda = cache_key("scores", dtype="torch.bfloat16", scorer="effort", **{**KEY, "device": "cuda"})
    assert cuda != bf16


def test_bumping_a_scorer_version_retires_old_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = ScoreCache(tmp_path)
    old = cache_key("scores", dtype="torch.float32", scorer="el2n", **KEY)
    cache.put_full(old, np.array([3.0]))
    monkeypatch.setitem(SCORER_VERSIONS, "el2n", SCORER_VERSIONS["el2n"] + 1)
    new = cache_key("scores", dtype="torch.float32", scorer="el2n", **KEY)
    assert new != old and cache.get_full(new) is None
    with pytest.raises(KeyError):
        cache_key("scores", dtype="x", scorer="no-such-scorer", **KEY)


def test_no_cache_reads_nothing_and_leaves_nothing(tmp_path: Path) -> None:
    cache = ScoreCache(tmp_path)
    cache.put_full("k", np.array([1.0]))
    off = ScoreCache(tmp_path, enabled=False)
    assert off.root != tmp_path
    assert off.get_full("k") is None
    root = off.root
    del off
    assert not root.exists()
