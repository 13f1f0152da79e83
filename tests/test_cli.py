"""The ``speccore`` command: flags, the bad-input table (exit 2, one line, nothing written), and
one end-to-end run on a real pretrained alias."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from speccore.cli import build_parser, main


def base_args(data: Path, dirs: dict[str, Path], out: Path) -> list[str]:
    return [
        "select", "--data", str(data), "--input-field", "dialogue", "--output-field", "summary",
        "--small", str(dirs["small"]), "--target", str(dirs["target"]), "--small-epochs", "1",
        "--regions", "3", "--verify-per-region", "2", "--max-length", "64", "--out", str(out),
    ]  # fmt: skip


def test_every_config_field_is_a_flag() -> None:
    import dataclasses

    from speccore.config import SelectConfig, select_flags

    args = build_parser().parse_args(["select", "--data", "x", "--no-fill", "--regions", "7"])
    assert args.fill is False and args.regions == 7
    shared = {f.name for f in dataclasses.fields(SelectConfig)} - {
        "lora",
        "train",
        "method_options",
    }
    assert shared <= set(vars(args))
    # Nested groups and every method's settings are flags too (flat names).
    assert {f.name for f in select_flags()} <= set(vars(args))
    assert {"lora_r", "learning_rate", "d2_k", "ccs_beta", "verify_per_region"} <= set(vars(args))
    for flag in (
        "--method",
        "--score",
        "--verify-per-region",
        "--small-epochs",
        "--seed",
        "--allocation",
    ):
        assert flag.lstrip("-").replace("-", "_") in vars(args)


def test_cli_select_prints_summary(
    jsonl_data: Path,
    model_dirs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    assert main([*base_args(jsonl_data, model_dirs, out), "--prune-rate", "0.75"]) == 0
    printed = capsys.readouterr().out
    assert "kept 6 of 24" in printed
    assert len(json.loads((out / "selection.json").read_text())["indices"]) == 6


def test_cli_token_keep_writes_masks_and_labels(
    jsonl_data: Path, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from speccore.tokens import load_token_masks

    out = tmp_path / "run"
    args = [*base_args(jsonl_data, model_dirs, out), "--prune-rate", "0.5", "--token-keep", "0.6"]
    assert main(args) == 0
    kept = json.loads((out / "selection.json").read_text())["indices"]
    indices, masks = load_token_masks(out / "token_masks.npz")
    assert indices.tolist() == kept and len(masks) == 12
    lines = [json.loads(x) for x in (out / "token_labels.jsonl").read_text().splitlines()]
    assert [x["index"] for x in lines] == kept
    for line, mask in zip(lines, masks, strict=True):
        assert len(line["input_ids"]) == len(line["labels"]) == len(mask)
        assert all(lab == -100 for lab, m in zip(line["labels"], mask, strict=True) if not m)
    info = json.loads((out / "token_selection.json").read_text())
    assert info["crossfit"] is True and 0.6 <= info["kept_fraction"] < 1


def bad_row_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text(text, encoding="utf-8")
    return path


GOOD = '{"dialogue": "a b c", "summary": "x y"}\n'


@pytest.mark.parametrize(
    ("case", "extra", "message"),
    [
        ("missing file", ["--data", "nope.jsonl"], "nope.jsonl"),
        ("empty", ["--data", "@"], "no rows"),
        ("malformed line", ["--data", GOOD + "{oops\n"], "row 2 (1-based)"),
        ("missing field", ["--data", GOOD + '{"dialogue": "a"}\n'], "row 2 (1-based)"),
        ("non-string", ["--data", GOOD + '{"dialogue": "a", "summary": 5}\n'], "row 2 (1-based)"),
        ("prune rate 1", ["--prune-rate", "1"], "--prune-rate"),
        ("prune rate < 0", ["--prune-rate", "-0.1"], "--prune-rate"),
        ("K < 1", ["--regions", "0"], "--regions"),
        ("b_v < 1", ["--verify-per-region", "0"], "--verify-per-region"),
        ("budget < 1", ["--prune-rate", "0.99"], "coreset would be empty"),
        (
            "empty response",
            ["--data", GOOD + '{"dialogue": "a", "summary": ""}\n'],
            "row 2 (1-based)",
        ),
        ("unknown method", ["--method", "magic"], "staff"),
    ],
)
def test_bad_input_is_one_clear_line(
    case: str,
    extra: list[str],
    message: str,
    jsonl_data: Path,
    model_dirs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    args = base_args(jsonl_data, model_dirs, out)
    if extra[0] == "--data" and extra[1] != "nope.jsonl":
        text = "" if extra[1] == "@" else extra[1]
        extra = ["--data", str(bad_row_file(tmp_path, text)), "--prune-rate", "0.5"]
    assert main([*args, *extra]) == 2, case
    # The error is one line (a progress bar of the model load may precede it).
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("speccore: error:")
    assert message in err
    assert not (out / "coreset.jsonl").exists() and not (out / "selection.json").exists()


@pytest.mark.slow
def test_real_alias_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI on the packaged SmolLM2-135M (dequantised once into a shared cache)."""
    import os

    from conftest import make_rows

    cache = Path(
        os.environ.get("SPECCORE_TEST_MODEL_CACHE", Path.home() / ".cache" / "speccore-tests")
    )
    monkeypatch.setenv("SPECCORE_CACHE", str(cache))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(8)), encoding="utf-8")
    out = tmp_path / "run"
    args = [
        "select", "--data", str(data), "--input-field", "dialogue", "--output-field", "summary",
        "--small", "smollm2-135m", "--target", "smollm2-135m", "--small-epochs", "1",
        "--regions", "2", "--verify-per-region", "2", "--max-length", "48", "--prune-rate", "0.5",
        "--lora-target-modules", "q_proj,v_proj", "--cache-dir", str(tmp_path / "scores"),
        "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    saved = json.loads((out / "selection.json").read_text())
    assert len(saved["indices"]) == 4
    assert all(s > 0 for s in saved["scores"])
    assert saved["info"]["n_verified"] >= 2
