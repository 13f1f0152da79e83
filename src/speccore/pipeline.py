"""``speccore.select``: data and models in, a coreset and its report out."""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import SelectConfig, coreset_size
from .data import Formatting, format_rows, load_rows, write_coreset
from .io import atomic_open
from .provider import ModelProvider
from .report import describe, summary_text
from .selection import Selection, get_method

if TYPE_CHECKING:
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

    ``select(SelectConfig(...))`` or ``select(data=..., small=..., target=..., prune_rate=0.9)``.
    """
    return select_with_tokens(config, **settings)[0]


def select_with_tokens(
    config: SelectConfig | None = None, **settings: Any
) -> tuple[Selection, TokenSelection | None]:
    """:func:`select`, also handing back the token masks when ``token_keep < 1`` (else ``None``).

    The bench fine-tunes on them without a run folder; :class:`Selection` stays what it
    serialises, so the masks travel beside it rather than on it.
    """
    cfg = config if config is not None else SelectConfig.from_dict(settings)
    cfg.validate()
    Formatting.from_config(cfg).validate()
    import_methods()
    method = get_method(cfg.method)
    start = time.perf_counter()
    dataset = load_rows(cfg.data, cfg.split)
    check_rows(dataset, cfg)
    budget = coreset_size(len(dataset), cfg.prune_rate)
    if cfg.dry_run:  # estimates only: info["dry_run"]; no coreset, nothing written
        from .dryrun import dry_run_selection

        return dry_run_selection(cfg, dataset, budget), None
    provider = ModelProvider(cfg, dataset)
    selection = method.select(provider, budget, cfg.seed)
    selection.method = cfg.method
    tokens = None
    if cfg.token_keep < 1:
        from .tokens import select_tokens

        with provider.stage("token selection"):
            tokens = select_tokens(provider, selection, cfg)
        selection.info["tokens"] = tokens.info
    selection.timings = {k: round(v, 4) for k, v in provider.timer.timings.items() if v >= 5e-4}
    selection.timings["total"] = round(time.perf_counter() - start, 4)
    selection.config = cfg.to_dict()
    selection.versions = versions()
    selection.info["target_samples_scored"] = sum(v.n_asked for v in provider.verifications)
    selection.info["report"] = describe(
        selection, dataset, cfg.output_field, cfg.group_field, provider.tokenized()
    )
    if cfg.out:
        write_run(cfg, dataset, selection, provider, tokens)
    return selection, tokens


def write_run(
    cfg: SelectConfig,
    dataset: Any,
    selection: Selection,
    provider: ModelProvider,
    tokens: Any = None,
) -> None:
    """The run folder: coreset in the input's format, selection.json, summary, small adapter,
    and the token masks when token-level selection ran."""
    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    small = next((s for s in provider.loaded_slots if s.role == "small"), None)
    if small is not None and small.tuned_adapter_dir is not None:
        dest = out / "small_adapter"
        tmp = out / ".small_adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(small.tuned_adapter_dir, tmp)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    write_coreset(cfg.data, dataset, selection.indices.tolist(), out, split=cfg.split)
    if tokens is not None:
        tokens.save(out, provider.target.data)
    selection.save(out / "selection.json")
    with atomic_open(out / "summary.txt") as f:
        f.write(summary_text(selection) + "\n")


def check_rows(dataset: Any, cfg: SelectConfig) -> None:
    """Find a bad row before any model loads (chat formats need the tokenizer: checked later)."""
    fmt = Formatting.from_config(cfg)
    if not fmt.chat_template and not fmt.messages_field:
        format_rows(dataset, fmt)


def import_methods() -> None:
    """Import every method module so that the registry is complete."""
    from . import selection  # noqa: F401
