"""``speccore.select``: data and models in, a coreset and its report out.

Everything that can be checked is checked before any model loads (:func:`preflight`): the
settings, the method's models, the data rows and fields, and the run folder. The run folder is
written as a whole: into a temporary sibling folder, moved into place at the end, under a lock,
so that an interrupted or failed run leaves nothing half-written and two runs cannot both
"succeed" into one folder.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import platform
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import SelectConfig, coreset_size
from .data import Formatting, format_rows, load_rows, write_coreset
from .errors import ConfigError, DataError
from .io import atomic_open
from .provider import ModelProvider
from .report import describe, summary_text
from .selection import Selection, get_method

if TYPE_CHECKING:
    from .models.pool import ModelPool
    from .tokens import TokenSelection

logger = logging.getLogger(__name__)

PACKAGES = ("speccore", "torch", "transformers", "peft", "datasets", "numpy", "scikit-learn")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def select(config: SelectConfig | None = None, **settings: Any) -> Selection:
    """Run a selection method end to end; write the run folder when ``out`` is set.

    ``select(SelectConfig(...))`` or ``select(data=..., small=..., target=..., prune_rate=0.9)``
    (any flag name with underscores, method settings included: ``regions=10``).
    """
    return select_with_tokens(config, **settings)[0]


def select_with_tokens(
    config: SelectConfig | None = None, *, pool: ModelPool | None = None, **settings: Any
) -> tuple[Selection, TokenSelection | None]:
    """:func:`select`, also handing back the token masks when ``token_keep < 1`` (else ``None``).

    The bench fine-tunes on them without a run folder; :class:`Selection` stays what it
    serialises, so the masks travel beside it rather than on it. ``pool`` shares loaded models
    between calls (a bench's cells).
    """
    cfg = config if config is not None else SelectConfig.from_dict(settings)
    start = time.perf_counter()
    dataset = preflight(cfg)
    budget = coreset_size(len(dataset), cfg.prune_rate)
    if cfg.dry_run:  # estimates only: info["dry_run"]; no coreset, nothing written
        from .dryrun import dry_run_selection

        return dry_run_selection(cfg, dataset, budget), None
    with run_lock(cfg.out), ModelProvider(cfg, dataset, pool) as provider:
        check_chat_formats(cfg, provider)
        selection, tokens = _run(cfg, provider, budget)
        selection.timings["total"] = round(time.perf_counter() - start, 4)
        if cfg.out:
            write_run(cfg, dataset, selection, provider, tokens)
    return selection, tokens


def _run(
    cfg: SelectConfig, provider: ModelProvider, budget: int
) -> tuple[Selection, TokenSelection | None]:
    selection = get_method(cfg.method).select(provider, budget, cfg.seed)
    selection.method = cfg.method
    tokens = None
    if cfg.token_keep < 1:
        from .tokens import select_tokens

        with provider.stage("token selection"):
            tokens = select_tokens(provider, selection, cfg)
        selection.info["tokens"] = tokens.info
    selection.timings = {k: round(v, 4) for k, v in provider.timer.timings.items() if v >= 5e-4}
    selection.info["stage_tokens"] = provider.timer.throughput()
    selection.config = cfg.to_dict()
    selection.versions = versions()
    selection.info["target_samples_scored"] = sum(v.n_asked for v in provider.verifications)
    selection.info["report"] = describe(
        selection, provider.dataset, cfg.output_field, cfg.group_field, provider.tokenized()
    )
    return selection, tokens


# ---------------------------------------------------------------------------------------------
# Checks before any model work
# ---------------------------------------------------------------------------------------------


def preflight(cfg: SelectConfig) -> Any:
    """Check settings, models, run folder and data before any model loads; return the rows."""
    cfg.validate()
    Formatting.from_config(cfg).validate()
    method = get_method(cfg.method)
    if cfg.engine == "ray":
        from .scoring.ray_engine import require_ray

        require_ray()
    check_models(cfg, method.needs)
    if cfg.dry_run:
        pass  # a dry run writes nothing
    elif cfg.out:
        check_out(cfg)
    else:
        logger.info("no --out: the coreset is returned but nothing is written")
    dataset = load_rows(cfg.data, cfg.split)
    check_rows(dataset, cfg)
    return dataset


def check_models(cfg: SelectConfig, needs: tuple[str, ...]) -> None:
    """Each model the method needs is named, and each name resolves: aliases, paths and hub
    names (a misspelt alias gets a suggestion; offline, a hub name fails at once)."""
    from .models.load import check_model_name

    for role in needs:
        name = cfg.small if role == "small" else cfg.target
        if role == "small" and cfg.scores:
            continue  # precomputed speculative scores stand in for the small model
        if not name:
            raise ConfigError(f"--{role} is required for method {cfg.method!r}")
        if not name.startswith("derive:"):
            check_model_name(name)
    if cfg.small and cfg.small.startswith("derive:") and not cfg.target:
        raise ConfigError(f"--small {cfg.small} derives the small model from --target: set it")


def check_out(cfg: SelectConfig) -> None:
    """The run folder can be written, holds no other run (unless ``overwrite``), and no input
    lives in it (the run replaces the folder as a whole)."""
    out = Path(str(cfg.out)).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; pass a folder for the run's outputs")
    parent = _existing_parent(out)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: cannot write in {parent} (permission denied)")
    for flag, value in (("--data", cfg.data), ("--scores", cfg.scores)):
        _refuse_inside(flag, value, out)
    _refuse_inside("--small-adapter", cfg.small_adapter, out)
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError(
            f"--out {out} already holds a run; pass --overwrite to replace it, or another --out"
        )


def _existing_parent(path: Path) -> Path:
    for p in [path, *path.parents]:
        if p.exists():
            return p
    return Path.cwd()


def _refuse_inside(flag: str, value: str | None, out: Path) -> None:
    if not value:
        return
    path = Path(value).expanduser()
    if not path.exists():
        return  # a hub name, or a file the loader will name
    inside = path.resolve() == out.resolve() or out.resolve() in path.resolve().parents
    if inside:
        raise ConfigError(
            f"{flag} {path} is inside --out {out}: the run would overwrite its own input; "
            "copy the input elsewhere or choose another --out"
        )


def check_rows(dataset: Any, cfg: SelectConfig) -> None:
    """Find a bad row or field before any model loads (chat formats need the tokenizer:
    :func:`check_chat_formats`)."""
    columns = list(getattr(dataset, "column_names", []) or [])
    if cfg.group_field and columns and cfg.group_field not in columns:
        raise DataError(
            f"--group-field {cfg.group_field!r} is not a field of {cfg.data}; "
            f"its fields: {', '.join(columns)}"
        )
    fmt = Formatting.from_config(cfg)
    if not fmt.chat_template and not fmt.messages_field:
        format_rows(dataset, fmt)


def check_chat_formats(cfg: SelectConfig, provider: ModelProvider) -> None:
    """With ``--chat-template``/``--messages-field``, tokenise the data with every model the
    method uses before any of them is trained: a tokenizer without a chat template fails now,
    naming its model."""
    fmt = Formatting.from_config(cfg)
    if not fmt.chat_template and not fmt.messages_field:
        return
    from .errors import ModelError

    for role in get_method(cfg.method).needs:
        if role == "small" and cfg.scores:
            continue
        slot = provider.small if role == "small" else provider.target
        try:
            _ = slot.data
        except ModelError as err:
            raise ModelError(f"{role} model {slot.name}: {err}") from None


# ---------------------------------------------------------------------------------------------
# The run folder
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def run_lock(out: str | None) -> Iterator[None]:
    """An exclusive lock on ``out`` while a run writes it (a lock file beside the folder)."""
    if not out:
        yield
        return
    import fcntl

    folder = Path(out).expanduser()
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock_path = folder.parent / f".{folder.name}.lock"
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"--out {folder}: another speccore run is writing it; wait for it or choose "
                "another --out"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            lock_path.unlink(missing_ok=True)


def write_run(
    cfg: SelectConfig,
    dataset: Any,
    selection: Selection,
    provider: ModelProvider,
    tokens: Any = None,
) -> None:
    """The run folder: coreset in the input's format, selection.json, summary, small adapter,
    and the token masks when token-level selection ran. Written into a temporary sibling and
    moved into place at the end."""
    from .io import copy_tree, make_temp_dir

    out = Path(str(cfg.out)).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f".{out.name}.")
    try:
        small = next((s for s in provider.loaded_slots if s.role == "small"), None)
        if small is not None and small.tuned_adapter_dir is not None:
            copy_tree(small.tuned_adapter_dir, tmp / "small_adapter")
        write_coreset(cfg.data, dataset, selection.indices.tolist(), tmp, split=cfg.split)
        if tokens is not None:
            tokens.save(tmp, provider.target.data)
        selection.save(tmp / "selection.json")
        with atomic_open(tmp / "summary.txt") as f:
            f.write(summary_text(selection) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, dest: Path) -> None:
    """Move folder ``new`` to ``dest``, replacing what is there (old folder moved aside first:
    a folder cannot be renamed over a non-empty one)."""
    from .io import publish_dir_mode

    publish_dir_mode(new)
    old = dest.parent / f".{dest.name}.old"
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dest, old)
    os.rename(new, dest)
    shutil.rmtree(old, ignore_errors=True)


def import_methods() -> None:
    """Import every method module so that the registry is complete."""
    from . import selection  # noqa: F401
