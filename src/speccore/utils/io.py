"""Small I/O helpers: atomic writes, fingerprints and the cache folder."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``), as set now or when the hub was imported."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    from_env = any(f is not None and f.strip().upper() in {"1", "ON", "YES", "TRUE"} for f in flags)
    return bool(constants.HF_HUB_OFFLINE) or from_env


#: One request to the hub, no retries: how long to wait for an answer before calling it offline.
HUB_TIMEOUT_S = 10.0


def ask_hub(repo_type: str, name: str) -> tuple[str, str]:
    """Whether ``name`` is a ``repo_type`` ("model" or "dataset") on the Hugging Face hub, by one
    request without retries: ``("found" | "missing" | "invalid" | "unsure" | "unreachable",
    detail)``. A gated repository is found (loading says if access is missing); "unsure": the
    hub answered with another error, which loading will report; "unreachable": no answer at all
    (connection refused, no DNS, a timeout)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
    )

    api = HfApi(endpoint=constants.ENDPOINT)
    info = api.model_info if repo_type == "model" else api.dataset_info
    try:
        info(name, timeout=HUB_TIMEOUT_S)
    except HFValidationError as e:
        return "invalid", first_line(e)
    except GatedRepoError:
        return "found", ""
    except RepositoryNotFoundError:
        return "missing", ""
    except HfHubHTTPError as e:
        return "unsure", first_line(e)
    except Exception as e:
        return "unreachable", first_line(e)
    return "found", ""


def first_line(error: BaseException) -> str:
    """An exception's first line of text (its type name when it has none)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def cache_root() -> Path:
    """The speccore cache folder: ``$SPECCORE_CACHE`` or the user's cache dir."""
    env = os.environ.get("SPECCORE_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("speccore"))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    A crash or an exception leaves any previous ``path`` untouched and removes the temp file,
    so a reader never sees half a file. The file gets the permissions any program's new file
    gets under the user's umask (0666 less the umask, usually 0644), whether or not it replaces
    an older file: ``mkstemp`` alone leaves 0600, which hides outputs from the user's group
    and from other accounts (a web server, a shared results folder).
    """
    path = Path(path)
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # The writer may have replaced the temp file; set the mode on whatever is there now.
        os.chmod(tmp_path, default_file_mode())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows.

    Linux reports it in ``/proc/self/status``. Elsewhere the only way is ``os.umask``, which
    sets a new mask while returning the old one; that swap is done under a lock, and with the
    strict 0o077 in between, so a file another thread creates meanwhile is never too open.
    """
    try:
        with open(_PROC_STATUS, encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode a new regular file gets: 0666 less the umask (0644 under umask 022)."""
    return 0o666 & ~current_umask()


def default_dir_mode() -> int:
    """The mode a new folder gets: 0777 less the umask (0755 under umask 022)."""
    return 0o777 & ~current_umask()


def make_dirs(path: str | os.PathLike[str]) -> Path:
    """``mkdir -p``: missing folders get :func:`default_dir_mode` (the kernel applies the umask)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def make_temp_dir(parent: str | os.PathLike[str], prefix: str) -> Path:
    """A new empty folder in ``parent`` for building output that is renamed into place later.

    Unlike ``tempfile.mkdtemp`` (always 0700) it gets :func:`default_dir_mode`, so the folder
    it becomes is as readable as one made with ``mkdir``.
    """
    parent = make_dirs(parent)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, default_dir_mode())
    return tmp


def publish_dir_mode(folder: str | os.PathLike[str]) -> None:
    """Give a folder built by ``tempfile.mkdtemp`` (0700) the mode of a ``mkdir`` folder."""
    os.chmod(folder, default_dir_mode())


def copy_tree(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy folder ``src`` to the new folder ``dst`` as freshly written files.

    ``shutil.copytree`` copies each file's and folder's mode, so a cached folder made private
    (0700, 0600) would stay private in the user's output; here files and folders get the modes
    of new ones under the umask. ``dst`` must not exist.
    """
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True)
    for root, dirs, files in os.walk(src, followlinks=True):
        target = dst / Path(root).relative_to(src)
        for name in dirs:
            (target / name).mkdir()
        for name in files:
            shutil.copyfile(Path(root) / name, target / name)
    return dst


_PROC_STATUS = "/proc/self/status"
_UMASK_LOCK = threading.Lock()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temp file for writing that replaces ``path`` only when the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
        yield f


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")


def save_npz(path: str | os.PathLike[str], **arrays: np.ndarray) -> None:
    """Save arrays to ``.npz`` atomically (never pickled: loaded with ``allow_pickle=False``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]


def load_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Load an ``.npz`` written by :func:`save_npz`; refuses pickled objects."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def fingerprint(*parts: Any) -> str:
    """A stable hex digest of JSON-able parts, arrays and bytes (like ``datasets``' fingerprints)."""
    h = hashlib.sha256()
    for part in parts:
        _update(h, part)
    return h.hexdigest()[:24]


def _update(h: Any, part: Any) -> None:
    if isinstance(part, bytes):
        h.update(b"b")
        h.update(part)
    elif isinstance(part, np.ndarray):
        h.update(f"a{part.dtype}{part.shape}".encode())
        h.update(np.ascontiguousarray(part).tobytes())
    else:
        h.update(b"j")
        h.update(json.dumps(part, sort_keys=True, default=_json_default).encode())
