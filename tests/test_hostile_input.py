"""Issue 23: what a hostile new user tries. Every case is one line on stderr, exit code 2,
before any model work, and nothing written; a folder speccore did not write is never replaced;
repeated rows are reported; two runs on one cache compute each value once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import make_rows, micro_bench_settings
from speccore.cli import main
from speccore.utils.runfolder import MARKER, folder_kind

Setup = Callable[[Path, dict[str, Path]], list[str]]


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a folder): what "nothing written"
    compares."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def no_model_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any model load fails the test: the error must come first."""
    import speccore.models as models
    import speccore.models.pool as pool
    import speccore.proxies.derive as derive

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the error")

    for module in (pool, models, derive):
        monkeypatch.setattr(module, "load_model", refuse)


def refused(args: list[str], root: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI; it must exit 2 with one ``speccore: error:`` line and leave ``root`` as it
    was. Returns the line. "Before any model work" is the ``no_model_work`` fixture's check,
    not a clock's."""
    capsys.readouterr()
    before = tree(root)
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err[-5:]
    assert err and err[-1].startswith("speccore: error:"), err[-5:]
    assert "Traceback" not in "\n".join(err)
    assert tree(root) == before, "something was written"
    return err[-1]


def select_args(data: Path, dirs: dict[str, Path], *extra: str) -> list[str]:
    return [
        "select", "--data", str(data), "--input-field", "dialogue", "--output-field", "summary",
        "--small", str(dirs["small"]), "--target", str(dirs["target"]), "--prune-rate", "0.5",
        "--regions", "3", "--verify-per-region", "2", "--small-epochs", "1", "--max-length", "64",
        *extra,
    ]  # fmt: skip


# --- the output folder ----------------------------------------------------------------------


def user_folder(tmp: Path, marker: str | None = None) -> Path:
    folder = tmp / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "precious.txt").write_text("years of work\n", encoding="utf-8")
    if marker:
        (folder / MARKER).write_text(json.dumps({"command": marker}), encoding="utf-8")
    return folder


def legacy_run(tmp: Path) -> Path:
    """A run folder written before the marker existed."""
    folder = tmp / "old-run"
    folder.mkdir()
    for name in ("selection.json", "coreset.jsonl", "summary.txt"):
        (folder / name).write_text("{}\n", encoding="utf-8")
    return folder


def a_file(tmp: Path) -> Path:
    path = tmp / "f.txt"
    path.write_text("x\n", encoding="utf-8")
    return path


OUT_CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "user folder": (lambda t: ["--out", str(user_folder(t))], "was not written by speccore"),
    "user folder, --overwrite": (
        lambda t: ["--out", str(user_folder(t)), "--overwrite"],
        "was not written by speccore",
    ),
    "a bench's folder, --overwrite": (
        lambda t: ["--out", str(user_folder(t, "bench")), "--overwrite"],
        "holds the output of `speccore bench`",
    ),
    "legacy run, no --overwrite": (
        lambda t: ["--out", str(legacy_run(t))],
        "already holds a run; pass --overwrite",
    ),
    "working directory": (lambda t: ["--out", ".", "--overwrite"], "is the working directory"),
    "parent of the working directory": (
        lambda t: ["--out", "..", "--overwrite"],
        "is the working directory or one of its parents",
    ),
    "working directory, absolute": (
        lambda t: ["--out", str(t / "work"), "--overwrite"],
        "is the working directory",
    ),
    "read-only file system": (lambda t: ["--out", "/proc/speccore-run"], "cannot write in /proc"),
    "under a file": (
        lambda t: ["--out", str(a_file(t) / "run")],
        "f.txt is a file, not a folder",
    ),
    "a file": (lambda t: ["--out", str(a_file(t))], "is a file; pass a folder"),
}


@pytest.mark.parametrize("case", list(OUT_CASES))
def test_out_folder_cases_are_refused_before_any_work(
    case: str,
    jsonl_data: Path,
    model_dirs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_model_work: None,
) -> None:
    make_args, message = OUT_CASES[case]
    work = tmp_path / "work"  # the working directory: empty, the data lives beside it
    work.mkdir()
    monkeypatch.chdir(work)
    extra = make_args(tmp_path)
    line = refused(select_args(jsonl_data, model_dirs, *extra), tmp_path, capsys)
    assert message in line, line


def test_overwrite_replaces_a_run_folder_and_marks_it(
    jsonl_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run written before the marker is still a run: --overwrite replaces it; the new folder
    carries the marker. An empty folder is used as it is."""
    base = [
        "select", "--data", str(jsonl_data), "--input-field", "dialogue",
        "--output-field", "summary", "--method", "random", "--prune-rate", "0.5",
    ]  # fmt: skip
    old = legacy_run(tmp_path)
    assert main([*base, "--out", str(old), "--overwrite"]) == 0
    assert folder_kind(old) == "select" and json.loads((old / MARKER).read_text())["command"]
    assert (old / "coreset.jsonl").read_text() != "{}\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*base, "--out", str(empty)]) == 0
    assert (empty / "coreset.jsonl").is_file() and (empty / MARKER).is_file()


# --- settings and data of select ------------------------------------------------------------


def nan_scores(tmp: Path) -> list[str]:
    path = tmp / "scores.json"
    path.write_text(json.dumps([0.5] * 2 + [float("nan")] + [0.5] * 21), encoding="utf-8")
    return ["--scores", str(path)]


def bad_config(tmp: Path) -> list[str]:
    path = tmp / "run.yaml"
    path.write_text("prune_rate: lots\n", encoding="utf-8")
    return ["--config", str(path)]


def empty_adapter(tmp: Path) -> list[str]:
    (tmp / "adapter").mkdir()
    return ["--small-adapter", str(tmp / "adapter")]


SELECT_CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "--split on a plain file": (lambda t: ["--split", "test"], "--split test: "),
    "--scores row 1-based": (nan_scores, "score of row 3 (1-based) is nan"),
    "missing --small-adapter": (
        lambda t: ["--small-adapter", str(t / "nope")],
        "nope' does not exist",
    ),
    "--small-adapter without adapter": (empty_adapter, "has no adapter_config.json"),
    "--small-epochs 0": (lambda t: ["--small-epochs", "0"], "--small-epochs must be > 0, got 0"),
    "--target-epochs 0": (
        lambda t: ["--method", "grand", "--target-epochs", "0"],
        "--target-epochs must be > 0",
    ),
    "--config type error": (bad_config, "--config "),
    "--dedupe with token selection": (
        lambda t: ["--dedupe", "--token-keep", "0.5"],
        "--dedupe with --token-keep below 1 is not supported",
    ),
    "--small derive:1.0": (
        lambda t: ["--small", "derive:1.0"],
        "layers '1.0' is ambiguous; write 1 for 1 layer (a count), or a fraction below 1",
    ),
}


@pytest.mark.parametrize("case", list(SELECT_CASES))
def test_select_settings_and_data_cases(
    case: str,
    jsonl_data: Path,
    model_dirs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_model_work: None,
) -> None:
    make_args, message = SELECT_CASES[case]
    extra = make_args(tmp_path)
    args = select_args(jsonl_data, model_dirs, "--out", str(tmp_path / "run"), *extra)
    line = refused(args, tmp_path, capsys)
    assert message in line, line
    if case == "--config type error":
        assert "run.yaml" in line and "prune_rate" in line


# --- a hub dataset without a network --------------------------------------------------------


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "hub unreachable"])
def test_a_hub_dataset_offline_fails_at_once_without_retries(
    how: str,
    jsonl_data: Path,
    model_dirs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_model_work: None,
) -> None:
    import socket

    import datasets
    import huggingface_hub

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("datasets.load_dataset was tried (and would retry)")

    monkeypatch.setattr(datasets, "load_dataset", no_download)
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        message = "not in the local cache while HF_HUB_OFFLINE is set"
    else:
        with socket.socket() as s:  # a port nobody listens on: connection refused at once
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        message = "cannot be reached"
    args = select_args(jsonl_data, model_dirs, "--out", str(tmp_path / "run"))
    args[args.index("--data") + 1] = "someone/no-such-dataset-xyz"
    line = refused(args, tmp_path, capsys)
    assert "--data someone/no-such-dataset-xyz" in line and message in line, line


# --- derive and agree -----------------------------------------------------------------------


def derive_args(dirs: dict[str, Path], *extra: str) -> list[str]:
    return [
        "derive", "--model", str(dirs["target"]), "--heal-steps", "0",
        "--layer-selection", "uniform", *extra,
    ]  # fmt: skip


def agree_args(data: Path, dirs: dict[str, Path], *extra: str) -> list[str]:
    return [
        "agree", "--small", str(dirs["small"]), "--target", str(dirs["target"]),
        "--data", str(data), "--input-field", "dialogue", "--output-field", "summary", *extra,
    ]  # fmt: skip


def one_row(tmp: Path) -> Path:
    path = tmp / "one.jsonl"
    path.write_text(json.dumps(make_rows(1)[0]) + "\n", encoding="utf-8")
    return path


DERIVE_AGREE_CASES: dict[str, tuple[Callable[[Path, Path, dict[str, Path]], list[str]], str]] = {
    "derive --layers 1.0": (
        lambda t, d, m: derive_args(m, "--layers", "1.0"),
        "write 1 for 1 layer (a count), or a fraction below 1 such as 0.5",
    ),
    "derive --layers 2.0": (lambda t, d, m: derive_args(m, "--layers", "2.0"), "write 2 for 2"),
    "derive --out a user folder": (
        lambda t, d, m: derive_args(m, "--out", str(user_folder(t))),
        "was not written by speccore",
    ),
    "derive --out .": (lambda t, d, m: derive_args(m, "--out", "."), "is the working directory"),
    "derive --out under a file": (
        lambda t, d, m: derive_args(m, "--out", str(a_file(t) / "small")),
        "is a file, not a folder",
    ),
    "derive --out a select run": (
        lambda t, d, m: derive_args(m, "--out", str(legacy_run(t))),
        "holds the output of `speccore select`",
    ),
    "agree on 1 row": (
        lambda t, d, m: agree_args(one_row(t), m),
        "has 1 row(s); agree needs at least 3",
    ),
    "agree --rows 2": (lambda t, d, m: agree_args(d, m, "--rows", "2"), "--rows must be >= 3"),
    "agree --split on a plain file": (
        lambda t, d, m: agree_args(d, m, "--split", "test"),
        "--split test: ",
    ),
}


@pytest.mark.parametrize("case", list(DERIVE_AGREE_CASES))
def test_derive_and_agree_cases(
    case: str,
    jsonl_data: Path,
    model_dirs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_model_work: None,
) -> None:
    make_args, message = DERIVE_AGREE_CASES[case]
    monkeypatch.setenv("SPECCORE_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    line = refused(make_args(tmp_path, jsonl_data, model_dirs), tmp_path, capsys)
    assert message in line, line


def test_an_interrupted_agree_says_that_a_rerun_starts_again(
    jsonl_data: Path,
    model_dirs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """agree keeps no partial scores (a resumed half would time only part of the rows), so a
    stop must not promise a resume: the real scoring loop is stopped by a real SIGTERM."""
    import speccore.scoring as scoring
    from speccore.utils import interrupt

    real = scoring.score_samples
    calls: list[int] = []

    def stopped(*args: object, **kwargs: object) -> np.ndarray:
        calls.append(1)
        if len(calls) == 2:  # after the warm-up row: a stop arrives while scoring
            os.kill(os.getpid(), signal.SIGTERM)
            interrupt.stop_point(lambda: 0, 24)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(scoring, "score_samples", stopped)
    monkeypatch.setenv("SPECCORE_CACHE", str(tmp_path / "cache"))
    assert main(agree_args(jsonl_data, model_dirs)) == 143
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        "speccore: interrupted: agree keeps no partial scores; rerun the same command to start "
        "again"
    )
    assert "resume" not in last
    assert not (tmp_path / "cache").exists(), "agree saved something it says it does not keep"


# --- a bench writes nothing until its config and data are good ------------------------------


def bench_case(
    tmp: Path, dirs: dict[str, Path], edit: Callable[[dict[str, object], Path], None]
) -> list[str]:
    settings = micro_bench_settings(tmp, dirs)
    edit(settings, tmp)
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return ["bench", str(path)]


def _set_data(key: str, value: object) -> Callable[[dict[str, object], Path], None]:
    def edit(settings: dict[str, object], tmp: Path) -> None:
        settings["data"][key] = value  # type: ignore[index]

    return edit


def _out(make: Callable[[Path], Path]) -> Callable[[dict[str, object], Path], None]:
    def edit(settings: dict[str, object], tmp: Path) -> None:
        settings["out"] = str(make(tmp))

    return edit


def _type_error(settings: dict[str, object], tmp: Path) -> None:
    settings["seeds"] = ["zero"]


def _bad_target(settings: dict[str, object], tmp: Path) -> None:
    settings["models"]["target"] = str(tmp / "no-such-model")  # type: ignore[index]


BENCH_CASES: dict[str, tuple[Callable[[dict[str, object], Path], None], str]] = {
    "missing eval file": (_set_data("eval", "nope-dev.jsonl"), "check the data.eval path"),
    "eval split on a plain file": (_set_data("eval_split", "test"), "data.eval_split test: "),
    "train split on a plain file": (_set_data("split", "test"), "data.split test: "),
    "config type error": (_type_error, "bench.yaml: seeds[0] must be int"),
    "target that does not exist": (_bad_target, "does not exist"),
    "out is a user folder": (_out(user_folder), "was not written by speccore"),
    "out is a select run": (_out(legacy_run), "holds the output of `speccore select`"),
    "out under a file": (_out(lambda t: a_file(t) / "bench"), "is a file, not a folder"),
}


@pytest.mark.parametrize("case", list(BENCH_CASES))
def test_a_bench_that_fails_validation_writes_nothing(
    case: str,
    model_dirs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_model_work: None,
) -> None:
    edit, message = BENCH_CASES[case]
    args = bench_case(tmp_path, model_dirs, edit)
    line = refused(args, tmp_path, capsys)
    assert message in line, line


# --- repeated rows --------------------------------------------------------------------------


@pytest.fixture
def repeated_rows(tmp_path: Path) -> Path:
    """3 distinct rows, each 8 times (rows 1, 2, 3, 1, 2, 3, ...)."""
    rows = make_rows(3) * 8
    path = tmp_path / "repeated.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_repeated_rows_are_reported_with_count_and_rows(
    repeated_rows: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import speccore

    with caplog.at_level("WARNING", logger="speccore"):
        sel = speccore.select(
            data=str(repeated_rows),
            input_field="dialogue",
            output_field="summary",
            method="random",
            prune_rate=0.5,
        )
    (warning,) = [r.getMessage() for r in caplog.records if "repeat" in r.getMessage()]
    assert "21 of 24 rows repeat an earlier row (rows 4, 5, 6, 7, 8, …, 1-based)" in warning
    assert "--dedupe" in warning
    assert sel.n_total == 24 and len(sel) == 12  # without --dedupe: every row is a sample


@pytest.mark.parametrize("method", ["random", "perplexity"])
def test_dedupe_selects_among_first_occurrences_with_file_indices(
    method: str, repeated_rows: Path, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """--dedupe: the budget is ⌊3·(1−p)⌋ of the distinct rows; indices are rows of the file,
    never a repeat; scores are per distinct row. perplexity runs its untuned small model."""
    out = tmp_path / "run"
    args = [
        "select", "--data", str(repeated_rows), "--input-field", "dialogue",
        "--output-field", "summary", "--method", method, "--prune-rate", "0.4",
        "--small", str(model_dirs["small"]), "--dedupe", "--max-length", "64",
        "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    record = json.loads((out / "selection.json").read_text(encoding="utf-8"))
    assert record["n_total"] == 24 and record["budget"] == 1
    assert set(record["indices"]) <= {0, 1, 2}
    assert record["info"]["dedupe"] == {"distinct_rows": [0, 1, 2], "duplicates_dropped": 21}
    if method == "perplexity":
        assert len(record["scores"]) == 3
    lines = (out / "coreset.jsonl").read_text(encoding="utf-8").splitlines()
    original = repeated_rows.read_text(encoding="utf-8").splitlines()
    assert lines == [original[i] for i in record["indices"]]


# --- two runs on one cache ------------------------------------------------------------------


@pytest.mark.slow
def test_two_runs_on_one_fresh_cache_tune_and_score_once(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Two real processes, one fresh cache, two --out folders: the small model is fine-tuned
    and scored once (the other run waits and reads the cache), and both get the same
    coreset and scores."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(200)), encoding="utf-8")
    cache = tmp_path / "cache"

    def command(out: str) -> list[str]:
        return [
            sys.executable, "-m", "speccore.cli", "select",
            *select_args(data, model_dirs, "--out", str(tmp_path / out))[1:],
            "--cache-dir", str(cache), "--max-batch-tokens", "256",
        ]  # fmt: skip

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(command(out), stderr=subprocess.PIPE, text=True, env=env)
        for out in ("a", "b")
    ]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errs]
    records = [json.loads((tmp_path / o / "selection.json").read_text()) for o in ("a", "b")]
    for stage in ("small fine-tune", "small scoring"):
        ran = [stage in r["timings"] for r in records]
        assert sum(ran) == 1, (stage, ran)
    verified = ["samples on the target model (" in e for e in errs]
    assert sum(verified) == 1, verified
    assert records[0]["indices"] == records[1]["indices"]
    assert records[0]["scores"] == records[1]["scores"]
    assert sum("waiting for another speccore process" in e for e in errs) == 1
