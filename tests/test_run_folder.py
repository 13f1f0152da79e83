"""What a user made is never lost, and errors come before work: the run folder is written as a
whole, never over an input, never by two runs at once; bad settings fail before any model
loads."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

import speccore
from conftest import tiny_select_config
from speccore.cli import main
from speccore.run.pipeline import preflight, run_lock
from speccore.utils.errors import ConfigError, DataError


def test_an_input_inside_out_is_refused_naming_both(
    jsonl_data: Path, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "x"
    out.mkdir()
    data = out / "coreset.jsonl"
    data.write_text(jsonl_data.read_text(encoding="utf-8"), encoding="utf-8")
    before = data.read_text(encoding="utf-8")
    cfg = tiny_select_config(data, model_dirs, out=str(out), overwrite=True)
    with pytest.raises(ConfigError, match=rf"--data {data}.*inside --out {out}"):
        speccore.select(cfg)
    assert data.read_text(encoding="utf-8") == before


def test_a_second_run_needs_overwrite_and_then_replaces_the_whole_folder(
    jsonl_data: Path, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    speccore.select(tiny_select_config(jsonl_data, model_dirs, out=str(out), method="random"))
    (out / "stale.csv").write_text("old run\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="already holds a run; pass --overwrite"):
        speccore.select(tiny_select_config(jsonl_data, model_dirs, out=str(out), method="random"))
    speccore.select(
        tiny_select_config(jsonl_data, model_dirs, out=str(out), method="random", overwrite=True)
    )
    assert not (out / "stale.csv").exists()
    assert {p.name for p in out.iterdir()} == {
        "coreset.jsonl",
        "selection.json",
        "summary.txt",
        ".speccore-run",  # the marker: --overwrite replaces only a folder that carries it
    }
    assert not list(tmp_path.glob(".run*")), "temporary or lock files left beside the run"


def test_a_failed_run_leaves_no_half_written_folder(
    jsonl_data: Path, model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import speccore.run.pipeline as pipeline

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(pipeline, "write_coreset", broken)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="disk full"):
        speccore.select(tiny_select_config(jsonl_data, model_dirs, out=str(out)))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]


def test_two_runs_cannot_write_one_folder_at_once(tmp_path: Path) -> None:
    out = str(tmp_path / "run")
    with (
        run_lock(out),
        pytest.raises(ConfigError, match="another speccore run is writing"),
        run_lock(out),
    ):
        pass
    with run_lock(out):  # released: a later run may write
        pass


def test_outputs_get_the_umask_mode(
    jsonl_data: Path, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        speccore.select(tiny_select_config(jsonl_data, model_dirs, out=str(out), method="random"))
    finally:
        os.umask(old)
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def fails_fast(cfg: speccore.SelectConfig, error: type[Exception], message: str) -> float:
    start = time.perf_counter()
    with pytest.raises(error, match=message):
        preflight(cfg)
    return time.perf_counter() - start


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lora_r": 0}, "--lora-r"),
        ({"batch_size": 0}, "--batch-size"),
        ({"max_batch_tokens": -1}, "--max-batch-tokens"),
        ({"target": "/no/such/model"}, "does not exist"),
        ({"group_field": "topik"}, "--group-field 'topik'"),
    ],
)
def test_bad_settings_fail_before_any_model_loads(
    settings: dict[str, object],
    message: str,
    jsonl_data: Path,
    model_dirs: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import speccore.models.pool as pool

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(pool, "load_model", no_loading)
    error = DataError if "group_field" in settings else Exception
    cfg = tiny_select_config(jsonl_data, model_dirs, **settings)
    assert fails_fast(cfg, error, message) < 5


def test_out_that_is_a_file_or_read_only_fails_first(
    jsonl_data: Path, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    a_file = tmp_path / "f.txt"
    a_file.write_text("x", encoding="utf-8")
    fails_fast(
        tiny_select_config(jsonl_data, model_dirs, out=str(a_file)), ConfigError, "is a file"
    )
    if os.geteuid() == 0:
        return  # root writes anywhere: the permission check cannot fail
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o555)
    fails_fast(
        tiny_select_config(jsonl_data, model_dirs, out=str(locked / "run")),
        ConfigError,
        "permission denied",
    )


def test_chat_template_on_a_model_without_one_names_it_before_training(
    jsonl_data: Path,
    model_dirs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import speccore.train as train

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was trained before the error")

    monkeypatch.setattr(train, "finetune", no_training)
    # A copy of the tiny small model whose tokenizer has no chat template (a base model).
    import json
    import shutil

    base = shutil.copytree(model_dirs["small"], tmp_path / "base-model")
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    args = [
        "select", "--data", str(jsonl_data), "--input-field", "dialogue",
        "--output-field", "summary", "--chat-template", "--small", str(base),
        "--target", str(model_dirs["target"]), "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("speccore: error: small model") and str(base) in err
    assert "chat template" in err


def test_select_without_out_in_the_cli_writes_a_fresh_run_folder(
    jsonl_data: Path,
    model_dirs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    args = [
        "select", "--data", str(jsonl_data), "--input-field", "dialogue",
        "--output-field", "summary", "--method", "random", "--prune-rate", "0.5",
    ]  # fmt: skip
    assert main(args) == 0
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "coreset.jsonl").is_file()
    assert f"wrote {Path('runs') / runs[0].name}/" in capsys.readouterr().out


def test_a_bench_with_neither_reference_row_prepares_its_data_first(
    tmp_path: Path, model_dirs: dict[str, Path]
) -> None:
    from conftest import micro_bench_settings
    from speccore.bench import run_bench
    from speccore.bench.bench_config import bench_config_from_dict

    settings = micro_bench_settings(tmp_path, model_dirs, full=False, zero_shot=False)
    settings["data"]["train_rows"] = 10  # a subset file the selections read from the bench folder
    result = run_bench(bench_config_from_dict(settings), plots=False)
    assert result.ran == ["random_p0.5_s0"]
    assert (Path(settings["out"]) / "data" / "train.jsonl").is_file()


def test_scores_of_more_than_one_dimension_are_refused(tmp_path: Path) -> None:
    import numpy as np

    from speccore.selection.scores_file import load_scores_file

    path = tmp_path / "scores.npy"
    np.save(path, np.ones((4, 6)))
    with pytest.raises(DataError, match=r"shape \(4, 6\); expected one score per row"):
        load_scores_file(str(path), 24)


@pytest.mark.slow
def test_sigterm_in_the_cli_saves_and_exits_143_with_one_line(
    jsonl_data: Path, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """A real ``speccore select`` process gets SIGTERM while the small model scores: it saves the
    batch in progress, prints one line and exits 143; the rerun resumes and finishes."""
    import json
    import signal
    import subprocess
    import sys

    from conftest import make_rows

    cache = tmp_path / "cache"
    data = tmp_path / "rows.jsonl"  # enough rows that scoring runs for a while
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(300)), encoding="utf-8")
    args = [
        sys.executable, "-m", "speccore.cli", "select", "--data", str(data),
        "--input-field", "dialogue", "--output-field", "summary",
        "--small", str(model_dirs["small"]), "--target", str(model_dirs["target"]),
        "--prune-rate", "0.5", "--regions", "3", "--verify-per-region", "2",
        "--small-epochs", "1", "--batch-size", "4", "--max-length", "64",
        "--max-batch-tokens", "64", "--checkpoint-seconds", "0.01",
        "--cache-dir", str(cache), "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    # Wait until scoring has saved a checkpoint (the fine-tune's adapter is cached first).
    while time.time() < deadline and not list(cache.glob("scores/*.checkpoint.npz")):
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before scoring saved a checkpoint"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("speccore: interrupted:") and "rerun the same command" in last
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()
    again = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "run" / "coreset.jsonl").is_file()
