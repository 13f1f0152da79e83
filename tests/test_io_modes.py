"""Files and folders speccore writes get the modes of any program's under the user's umask."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pytest

from speccore.data import load_rows, write_coreset
from speccore.utils import io
from speccore.utils.io import (
    atomic_open,
    atomic_path,
    copy_tree,
    current_umask,
    default_dir_mode,
    default_file_mode,
    make_dirs,
    make_temp_dir,
    save_npz,
    write_json,
)


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=["umask022", "umask077", "umask002"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def what_open_gives(folder: Path, umask: int) -> tuple[int, int]:
    """The modes a plain ``open(..., "w")`` and ``mkdir`` give here: the yardstick."""
    plain = folder / "plain.txt"
    plain.write_text("x")
    sub = folder / "plain_dir"
    sub.mkdir()
    assert mode(plain) == 0o666 & ~umask  # the OS agrees with the arithmetic below
    return mode(plain), mode(sub)


def test_umask_is_read_without_changing_it(umask: int) -> None:
    assert current_umask() == umask
    assert os.umask(umask) == umask  # still set: reading it left it alone
    assert default_file_mode() == 0o666 & ~umask
    assert default_dir_mode() == 0o777 & ~umask


def test_umask_fallback_without_proc(umask: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(io, "_PROC_STATUS", "/nonexistent/status")
    assert current_umask() == umask
    assert os.umask(umask) == umask


def test_atomic_writes_get_the_umask_mode(tmp_path: Path, umask: int) -> None:
    file_mode, dir_mode = what_open_gives(tmp_path, umask)
    write_json(tmp_path / "selection.json", {"a": 1})
    with atomic_open(tmp_path / "summary.txt") as f:
        f.write("done\n")
    save_npz(tmp_path / "scores.npz", s=np.arange(3.0))
    with atomic_path(tmp_path / "deep" / "er" / "plot.png") as tmp:
        tmp.write_bytes(b"png")
    for name in ["selection.json", "summary.txt", "scores.npz", "deep/er/plot.png"]:
        assert mode(tmp_path / name) == file_mode, name
    assert mode(tmp_path / "deep") == dir_mode and mode(tmp_path / "deep" / "er") == dir_mode
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_replacing_a_private_file_gives_the_umask_mode(tmp_path: Path, umask: int) -> None:
    # An output left 0600 by an older speccore (or mkstemp) is not kept private on rewrite.
    target = tmp_path / "coreset.jsonl"
    target.write_text("old\n")
    target.chmod(0o600)
    with atomic_open(target) as f:
        f.write("new\n")
    assert target.read_text() == "new\n"
    assert mode(target) == 0o666 & ~umask


def test_writer_that_replaces_the_temp_file(tmp_path: Path, umask: int) -> None:
    # Some writers (savefig, save_pretrained helpers) write their own temp file and rename it
    # over the path they were given; the mode is fixed on whatever file is there at the end.
    with atomic_path(tmp_path / "out.bin") as tmp:
        fd, inner = tempfile.mkstemp(dir=tmp_path)
        os.write(fd, b"data")
        os.close(fd)
        os.replace(inner, tmp)
    assert mode(tmp_path / "out.bin") == 0o666 & ~umask


def test_failed_write_leaves_nothing(tmp_path: Path, umask: int) -> None:
    with pytest.raises(RuntimeError), atomic_open(tmp_path / "x.json") as f:
        f.write("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "hub"])
def test_coreset_files_get_the_umask_mode(tmp_path: Path, umask: int, kind: str) -> None:
    rows = [{"q": f"q{i}", "a": f"a{i}"} for i in range(4)]
    if kind == "hub":  # a loaded Dataset without a file: written as JSONL from the rows
        source, dataset = "org/data", datasets.Dataset.from_list(rows)
    else:
        path = tmp_path / f"train.{kind}"
        if kind == "jsonl":
            path.write_text("".join(f'{{"q": "q{i}", "a": "a{i}"}}\n' for i in range(4)))
        elif kind == "json":
            path.write_text('[{"q": "q0", "a": "a0"}, {"q": "q1", "a": "a1"}]')
        elif kind == "csv":
            path.write_text("q,a\nq0,a0\nq1,a1\n")
        else:
            datasets.Dataset.from_list(rows).to_parquet(str(path))
        path.chmod(0o600)  # a private input must not make the output private
        source, dataset = str(path), load_rows(str(path))
    out = write_coreset(source, dataset, [0, 1], tmp_path / "run" / "out")
    assert mode(out) == 0o666 & ~umask
    assert mode(tmp_path / "run") == 0o777 & ~umask
    assert mode(tmp_path / "run" / "out") == 0o777 & ~umask


def test_folders(tmp_path: Path, umask: int) -> None:
    _, dir_mode = what_open_gives(tmp_path, umask)
    assert mode(make_dirs(tmp_path / "a" / "b")) == dir_mode
    built = make_temp_dir(tmp_path / "cache", prefix=".adapter.")
    assert mode(built) == dir_mode  # not mkdtemp's 0700
    assert mode(tmp_path / "cache") == dir_mode
    # A private cached folder copied into a run folder becomes an ordinary folder there.
    private = tmp_path / "private"
    (private / "sub").mkdir(parents=True)
    (private / "adapter.bin").write_bytes(b"w")
    (private / "sub" / "config.json").write_text("{}")
    for p in [private / "adapter.bin", private / "sub" / "config.json"]:
        p.chmod(0o600)
    (private / "sub").chmod(0o700)
    private.chmod(0o700)
    copied = copy_tree(private, tmp_path / "run" / "small_adapter")
    assert (copied / "sub" / "config.json").read_text() == "{}"
    assert mode(copied) == dir_mode and mode(copied / "sub") == dir_mode
    assert mode(copied / "adapter.bin") == 0o666 & ~umask
    assert mode(copied / "sub" / "config.json") == 0o666 & ~umask
