"""Folders speccore writes as a whole (a run, a bench, a derived model): their marker, and the
checks on an output folder that must pass before any work.

A folder speccore made carries a small marker file, :data:`MARKER` (``.speccore-run``), naming
the command that wrote it. Only such a folder is ever replaced (``select --overwrite``) or
written into (a bench resuming); any other non-empty folder is refused, with or without
``--overwrite``, so that a mistyped ``--out`` never deletes a user's files. Folders written
before the marker existed are recognised by their own files (:func:`folder_kind`).
"""

from __future__ import annotations

import errno
import importlib.metadata
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .io import write_json

MARKER = ".speccore-run"
COMMANDS = ("select", "bench", "derive")

# What a run folder of ``speccore select`` held before the marker: a folder with
# selection.json and nothing but these entries is a run.
_LEGACY_RUN_FILES = {
    "selection.json",
    "summary.txt",
    "small_adapter",
    "token_masks.npz",
    "token_scores.npz",
    "token_selection.json",
    "token_labels.jsonl",
}
_LEGACY_RUN_PREFIX = "coreset."


def write_marker(folder: str | os.PathLike[str], command: str) -> None:
    """Mark ``folder`` as written by ``speccore <command>`` (atomically)."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}")
    try:
        version = importlib.metadata.version("speccore")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    write_json(Path(folder) / MARKER, {"command": command, "speccore": version})


def folder_kind(folder: str | os.PathLike[str]) -> str | None:
    """The command that wrote ``folder`` ("select", "bench", "derive"), or None for a folder
    speccore did not write (or that is missing or empty)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    marker = _read_marker(folder / MARKER)
    if marker is not None:
        return marker
    names = {p.name for p in folder.iterdir()}
    if "selection.json" in names and all(
        n in _LEGACY_RUN_FILES or n.startswith(_LEGACY_RUN_PREFIX) for n in names
    ):
        return "select"
    if "bench_config.json" in names:
        return "bench"
    if "derivation.json" in names and "config.json" in names:
        return "derive"
    return None


def _read_marker(path: Path) -> str | None:
    try:
        record: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    command = record.get("command") if isinstance(record, dict) else None
    return command if command in COMMANDS else None


def is_empty_dir(folder: Path) -> bool:
    return folder.is_dir() and not any(folder.iterdir())


def check_out_folder(
    out: str | os.PathLike[str],
    command: str,
    *,
    flag: str = "--out",
    overwrite: bool | None = None,
    replaces: bool = True,
) -> Path:
    """Check an output folder before any work; return it (``~`` expanded).

    ``command`` is the command that will write it; ``replaces``: the command replaces the
    folder as a whole (select, derive), so it must not be the working directory or one of its
    parents; otherwise it writes into it (a bench). ``overwrite``: None when the command has no
    ``--overwrite`` (a folder of the same command is then accepted: the caller decides).

    Refused, with one line naming ``flag``: a file; a path under a file; a folder that cannot
    be written (permission, read-only file system, /proc); a non-empty folder speccore did not
    write (whatever ``overwrite`` says); a folder another command wrote; a run folder without
    ``overwrite`` when ``overwrite`` is False.
    """
    path = check_out_path(out, flag, replaces=replaces)
    check_out_contents(path, command, flag=flag, overwrite=overwrite, replaces=replaces)
    return path


def check_out_path(out: str | os.PathLike[str], flag: str = "--out", *, replaces: bool) -> Path:
    """The checks of :func:`check_out_folder` on the path alone (not what the folder holds)."""
    path = Path(out).expanduser()
    where = f"{flag} {out}"
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{where} is a file; pass a folder for the outputs")
    ancestor = existing_ancestor(path)
    if not ancestor.is_dir():
        raise ConfigError(
            f"{where}: {ancestor} is a file, not a folder; pass a path whose parents are folders"
        )
    if replaces:
        _refuse_cwd(path, where)
    # A command that replaces the folder renames in its parent; a bench writes into it.
    writable_in = existing_ancestor(path.parent) if replaces else ancestor
    check_writable(writable_in, where)
    return path


def check_out_contents(
    path: Path,
    command: str,
    *,
    flag: str = "--out",
    overwrite: bool | None = None,
    replaces: bool = True,
) -> None:
    """The checks of :func:`check_out_folder` on what the folder holds."""
    where = f"{flag} {path}"
    if not path.is_dir() or is_empty_dir(path):
        return
    kind = folder_kind(path)
    if kind is None:
        raise ConfigError(
            f"{where} is not empty and was not written by speccore (no {MARKER}); "
            f"speccore {'replaces' if replaces else 'writes into'} its output folder, so pass "
            "a new or empty folder"
        )
    if kind != command:
        raise ConfigError(
            f"{where} holds the output of `speccore {kind}`, not of `speccore {command}`; "
            "pass another folder"
        )
    if overwrite is False:
        raise ConfigError(
            f"{where} already holds a run; pass --overwrite to replace it, or another {flag}"
        )


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (the working directory for a relative
    path with no existing part)."""
    for p in [path, *path.parents]:
        if p.exists():
            return p
    return Path.cwd()


def _refuse_cwd(path: Path, where: str) -> None:
    cwd = Path.cwd().resolve()
    resolved = path.resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ConfigError(
            f"{where} is the working directory or one of its parents; the output replaces "
            "that folder as a whole: pass a new folder, e.g. runs/NAME"
        )


def check_writable(folder: Path, where: str) -> None:
    """Create and remove a temporary folder in ``folder``: the one sure test (root passes
    ``os.access`` everywhere, and /proc or a read-only mount refuse only the real write)."""
    try:
        probe = tempfile.mkdtemp(prefix=".speccore-probe-", dir=folder)
    except OSError as err:
        reason = {
            errno.EACCES: "permission denied",
            errno.EPERM: "permission denied",
            errno.EROFS: "read-only file system",
        }.get(err.errno or 0, err.strerror or type(err).__name__)
        raise ConfigError(
            f"{where}: cannot write in {folder} ({reason}); pass a folder on a writable disk"
        ) from None
    os.rmdir(probe)
