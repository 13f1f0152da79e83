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
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import SelectConfig, coreset_size
from ..data import Formatting, format_rows, load_rows, write_coreset
from ..selection import ModelWork, Selection, get_method
from ..utils.errors import ConfigError, DataError
from ..utils.io import atomic_open
from ..utils.runfolder import check_out_contents, check_out_path, write_marker
from .provider import ModelProvider
from .summary import describe, summary_text

if TYPE_CHECKING:
    from ..models.pool import ModelPool
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
    config: SelectConfig | None = None,
    *,
    pool: ModelPool | None = None,
    expect: Collection[ModelWork] = (),
    **settings: Any,
) -> tuple[Selection, TokenSelection | None]:
    """:func:`select`, also handing back the token masks when ``token_keep < 1`` (else ``None``).

    The bench fine-tunes on them without a run folder; :class:`Selection` stays what it
    serialises, so the masks travel beside it rather than on it. ``pool`` shares loaded models
    between calls (a bench's cells); ``expect`` names work that later calls will ask of the
    same cache (a bench's other methods), so a fine-tune keeps the snapshots they need.
    """
    cfg = config if config is not None else SelectConfig.from_dict(settings)
    start = time.perf_counter()
    dataset = preflight(cfg)
    # With --dedupe the method sees the first occurrence of each row only.
    rows = distinct_rows(dataset) if cfg.dedupe else None
    work = dataset if rows is None else dataset.select(rows.tolist())
    budget = coreset_size(len(work), cfg.prune_rate)
    if cfg.dry_run:  # estimates only: info["dry_run"]; no coreset, nothing written
        from .dryrun import dry_run_selection

        return dry_run_selection(cfg, work, budget), None
    declared = get_method(cfg.method).requests(cfg, len(work))
    with (
        run_lock(cfg.out),
        ModelProvider(cfg, work, pool, declared=declared, expect=expect) as provider,
    ):
        check_chat_formats(cfg, provider)
        selection, tokens = _run(cfg, provider, budget)
        if rows is not None:
            to_file_rows(selection, rows, len(dataset))
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
    selection.info["target_samples_scored"] = provider.rows_scored.get("target", 0)
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
        from ..scoring.ray_engine import require_ray

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
    if cfg.dedupe:
        check_inputs(cfg, len(distinct_rows(dataset)))
    else:
        warn_duplicates(dataset)
        check_inputs(cfg, len(dataset))
    return dataset


def check_models(cfg: SelectConfig, needs: tuple[str, ...]) -> None:
    """Each model the method needs is named, and each name resolves: aliases, paths and hub
    names (a misspelt alias gets a suggestion; offline, a hub name fails at once)."""
    from ..models.load import check_model_name

    for role in needs:
        name = cfg.small if role == "small" else cfg.target
        if role == "small" and cfg.scores:
            continue  # precomputed speculative scores stand in for the small model
        if not name:
            raise ConfigError(f"--{role} is required for method {cfg.method!r}")
        if not name.startswith("derive:"):
            check_model_name(name)
    if cfg.small and cfg.small.startswith("derive:"):
        if not cfg.target:
            raise ConfigError(f"--small {cfg.small} derives the small model from --target: set it")
        from ..proxies.derive import parse_derive_spec

        parse_derive_spec(cfg.small)  # its layers and keys, before the target loads


def check_out(cfg: SelectConfig) -> None:
    """The run folder can be written, is not the working directory (or a parent of it), is
    new, empty or a speccore run (replaced only with ``overwrite``), and no input lives in it
    (the run replaces the folder as a whole)."""
    out = check_out_path(str(cfg.out), replaces=True)
    for flag, value in (("--data", cfg.data), ("--scores", cfg.scores)):
        _refuse_inside(flag, value, out)
    _refuse_inside("--small-adapter", cfg.small_adapter, out)
    check_out_contents(out, "select", overwrite=cfg.overwrite)


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


def check_inputs(cfg: SelectConfig, n: int) -> None:
    """``--small-adapter`` is an adapter folder and ``--scores`` holds one finite score for
    each of the ``n`` rows selected from, before any model loads."""
    if cfg.small_adapter:
        from ..models.lora import check_adapter_folder

        check_adapter_folder(cfg.small_adapter, "--small-adapter")
    if cfg.scores:
        from ..selection.scores_file import load_scores_file

        load_scores_file(cfg.scores, n)


def distinct_rows(dataset: Any) -> np.ndarray:
    """Indices of the first occurrence of every distinct row (rows equal in every field)."""
    return np.array(sorted(_first_occurrences(dataset).values()), dtype=np.int64)


def _first_occurrences(dataset: Any) -> dict[str, int]:
    first: dict[str, int] = {}
    for i, row in enumerate(dataset):
        first.setdefault(json.dumps(row, sort_keys=True, default=str), i)
    return first


def warn_duplicates(dataset: Any) -> bool:
    """Log how many rows repeat an earlier one and where (1-based); whether any do."""
    first = _first_occurrences(dataset)
    if len(first) == len(dataset):
        return False
    keep = set(first.values())
    repeats = [i for i in range(len(dataset)) if i not in keep]
    shown = ", ".join(str(i + 1) for i in repeats[:5]) + (", …" if len(repeats) > 5 else "")
    logger.warning(
        "%d of %d rows repeat an earlier row (rows %s, 1-based); they count as separate "
        "samples: pass --dedupe to select among the first occurrences only",
        len(repeats),
        len(dataset),
        shown,
    )
    return True


def to_file_rows(selection: Selection, rows: np.ndarray, n_file: int) -> None:
    """Turn a selection made on the distinct rows ``rows`` (``--dedupe``) into indices of the
    input file; ``scores`` and ``regions`` stay per distinct row, listed in
    ``info["dedupe"]["distinct_rows"]``."""
    selection.info["dedupe"] = {
        "distinct_rows": rows.tolist(),
        "duplicates_dropped": n_file - len(rows),
    }
    selection.indices = rows[selection.indices]
    selection.n_total = n_file


def check_chat_formats(cfg: SelectConfig, provider: ModelProvider) -> None:
    """With ``--chat-template``/``--messages-field``, tokenise the data with every model the
    method uses before any of them is trained: a tokenizer without a chat template fails now,
    naming its model."""
    fmt = Formatting.from_config(cfg)
    if not fmt.chat_template and not fmt.messages_field:
        return
    from ..utils.errors import ModelError

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
    from ..utils.io import copy_tree, make_temp_dir

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
        write_marker(tmp, "select")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, dest: Path) -> None:
    """Move folder ``new`` to ``dest``, replacing what is there (old folder moved aside first:
    a folder cannot be renamed over a non-empty one)."""
    from ..utils.io import publish_dir_mode

    publish_dir_mode(new)
    old = dest.parent / f".{dest.name}.old"
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dest, old)
    os.rename(new, dest)
    shutil.rmtree(old, ignore_errors=True)
