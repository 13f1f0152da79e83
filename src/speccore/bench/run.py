"""The bench loop: for every (method, pruning rate, seed, token_keep) select, fine-tune the
target, generate, score; one JSON per finished cell, so an interrupted bench resumes where it
stopped.

Cells run seed by seed (all methods and rates of seed 0 first), so a partial bench already
holds comparable rows. The target is loaded once; each cell attaches a fresh seeded LoRA to it
and detaches it afterwards (without merging), so the base weights every cell starts from are
the pretrained ones. Selections go through :func:`speccore.select` with one cache in the bench
folder: the small model's adapter and scores, the tuned target of the baselines and verified
target scores are computed once and reused by every later cell that needs them.

A cell with ``token_keep < 1`` makes the same sample selection as its sample-level twin (from
the cache), then keeps the top ``token_keep`` of each row's response tokens; the target trains
with the other tokens' labels set to -100. ``token_keep`` 1.0 is the sample-level code path
itself, untouched, so its cells are bit for bit those of a bench without token selection.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import TrainSettings
from ..data import Formatting, load_rows, prompt_texts, tokenize_dataset
from ..models.pool import ModelPool
from ..selection.agreement import verified_rand_index
from ..utils import interrupt
from ..utils.errors import ConfigError, DataError
from ..utils.io import atomic_open, fingerprint, write_json
from ..utils.progress import progress
from ..utils.runfolder import write_marker
from .bench_config import THROUGHPUT_ONLY, BenchConfig, check_bench_folder, load_bench_config
from .generate import generate
from .metrics import evaluate_rows, nll_metrics, reference_nll_rows
from .report import collect_rows, write_reports
from .versions import cell_fingerprint, cell_versions, what_changed

if TYPE_CHECKING:
    import datasets

    from ..data.batches import TokenizedData
    from ..models import LoadedModel
    from ..run.tokens import TokenSelection
    from ..selection import ModelWork, Selection

logger = logging.getLogger(__name__)

FULL = "full"
ZERO_SHOT = "zero-shot"
#: Metrics that need generated text (None in a cell scored by its reference NLL only).
GENERATED_METRICS = ("rougeL", "rougeL_lo", "rougeL_hi", "bleu4", "bleu4_lo", "bleu4_hi")


@dataclass(frozen=True)
class Cell:
    """One bench row: a method at a pruning rate with a seed (``full``: p = 0; ``zero-shot``:
    no fine-tuning, no seed), training on ``token_keep`` of the coreset's response tokens."""

    method: str
    prune_rate: float = 0.0
    seed: int | None = None
    token_keep: float = 1.0

    @property
    def name(self) -> str:
        """``staff_p0.9_s0``; a token cell adds ``_tok0.6``. Sample-level cells keep the names
        they had before token selection existed, so their finished files stay valid."""
        if self.method == ZERO_SHOT:
            return ZERO_SHOT
        if self.method == FULL:
            return f"{FULL}_s{self.seed}"
        name = f"{self.method}_p{self.prune_rate:g}_s{self.seed}"
        return name if self.token_keep >= 1 else f"{name}_tok{self.token_keep:g}"


def plan_cells(cfg: BenchConfig) -> list[Cell]:
    """Every cell of the bench in run order: zero-shot, then per seed full data and each
    (pruning rate, method, token_keep)."""
    cells = [Cell(ZERO_SHOT)] if cfg.zero_shot else []
    for seed in cfg.seeds:
        if cfg.full:
            cells.append(Cell(FULL, 0.0, seed))
        for p in cfg.prune_rates:
            for m in cfg.methods:
                cells += [Cell(m, p, seed, k) for k in cfg.token_keeps_for(m)]
    return cells


@dataclass
class BenchData:
    """The training rows selections and fine-tunes use, and the evaluation rows."""

    train: datasets.Dataset
    eval: datasets.Dataset
    references: list[list[str]]


@dataclass
class CellRun:
    """A cell's predictions, its fine-tune statistics and times (no fine-tune: ``None``)."""

    predictions: list[str]
    train_stats: dict[str, float]
    train_seconds: float | None
    generate_seconds: float
    nll: np.ndarray | None = None
    nll_seconds: float = 0.0


@dataclass
class BenchResult:
    """What :func:`run_bench` did and wrote."""

    folder: Path
    rows: list[dict[str, Any]]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)


def run_bench(config: BenchConfig | str | Path, *, plots: bool = True) -> BenchResult:
    """Run (or resume) a bench; returns the rows of every finished cell.

    ``config`` is a :class:`BenchConfig` or the path of a bench YAML file. Writes into
    ``config.out``: ``cells/*.json`` (one per finished cell), ``selections/*.json``,
    ``results.csv``, ``table.md`` and the plots.
    """
    cfg = config if isinstance(config, BenchConfig) else load_bench_config(config)
    cfg.validate()
    return BenchRunner(cfg).run(plots=plots)


class BenchRunner:
    """Runs the cells of one bench; the target model and tokenised data are made once."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.folder = cfg.folder
        self.settings = cfg.settings_dict()
        self.settings_fp = fingerprint(self.settings)
        self.token_settings = cfg.token_settings()
        self._data: BenchData | None = None
        # One pool for every cell: the small model and the target load once per bench.
        self.pool = ModelPool()
        self._loaded: LoadedModel | None = None
        self._base: Any = None
        self._train_tokens: TokenizedData | None = None
        self._eval_tokens: TokenizedData | None = None
        self._prompts: list[str] | None = None
        # False: the training subset is not written into the bench folder (the dry run).
        self.data_to_write = True

    @property
    def expected_work(self) -> list[ModelWork]:
        """The model work of every selecting cell: each cell's provider knows what the others
        will ask of the shared cache (S2L's checkpoints of the small fine-tune STAFF runs)."""
        from ..selection import get_method

        work: list[ModelWork] = []
        for cell in plan_cells(self.cfg):
            if cell.seed is None or cell.method in (FULL, ZERO_SHOT):
                continue
            cfg = self.cfg.select_config(cell.method, cell.prune_rate, cell.seed, cell.token_keep)
            work += get_method(cfg.method).requests(cfg, len(self.data.train))
        return work

    # --- the loop ------------------------------------------------------------------------

    def run(self, plots: bool = True) -> BenchResult:
        check_bench_folder(self.cfg)
        done = load_cells(self.folder)
        check_settings(done, self.settings, self.folder, self.token_settings)
        cells = plan_cells(self.cfg)
        # Cells made by other code or another variant definition are run again, never mixed in.
        for name, changed in self.stale(cells, done).items():
            logger.warning("cell %s is stale (%s): running it again", name, "; ".join(changed))
            del done[name]
        todo = [c for c in cells if c.name not in done]
        if todo:
            # Before anything is written: a missing or bad data file leaves no folder behind.
            # The training subset the selections read exists before any cell.
            _ = self.data
        self.folder.mkdir(parents=True, exist_ok=True)
        write_marker(self.folder, "bench")
        write_json(
            self.folder / "bench_config.json", {"settings": self.settings, **_plan(self.cfg)}
        )
        result = BenchResult(self.folder, [], skipped=[c.name for c in cells if c.name in done])
        if result.skipped:
            logger.info(
                "resuming: %d of %d cells already finished", len(result.skipped), len(cells)
            )
        for cell in progress(todo, desc="bench cells", unit="cell"):
            # A stop signal ends the bench between cells, or inside one at the next batch:
            # what is saved is the finished cells (and any scoring checkpoint of the cell).
            interrupt.report(sum(c.name in done for c in cells), len(cells), "cells")
            interrupt.check()
            record = self.run_cell(cell)
            write_json(cell_path(self.folder, cell.name), record)
            done[cell.name] = record
            result.ran.append(cell.name)
            # The tables stay current during a bench.
            write_reports(self.folder, done, plots=False, bases=self.cfg.variant_bases())
        result.outputs = write_reports(
            self.folder, done, plots=plots, bases=self.cfg.variant_bases()
        )
        result.rows = collect_rows(done)
        return result

    def versions(self, cell: Cell) -> dict[str, Any]:
        """The code versions ``cell``'s result depends on (:mod:`speccore.bench.versions`)."""
        selected = cell.method not in (FULL, ZERO_SHOT)
        method = self.cfg.base_method(cell.method) if selected else None
        return cell_versions(method, fine_tuned=cell.method != ZERO_SHOT)

    def cell_fp(self, cell: Cell) -> str:
        return cell_fingerprint(self.versions(cell), self.cfg.variants.get(cell.method))

    def stale(self, cells: list[Cell], done: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
        """The planned cells already finished by other code or under another variant
        definition, with what changed."""
        out = {}
        for cell in cells:
            record = done.get(cell.name)
            if record is not None and record.get("cell_fp") != self.cell_fp(cell):
                variant = self.cfg.variants.get(cell.method)
                out[cell.name] = what_changed(record, self.versions(cell), variant) or ["unknown"]
        return out

    def run_cell(self, cell: Cell) -> dict[str, Any]:
        """Select (unless full or zero-shot), fine-tune, generate and score one cell."""
        logger.info("cell %s", cell.name)
        selection, tokens = None, None
        if cell.method not in (FULL, ZERO_SHOT):
            selection, tokens = self.select(cell)
        indices = np.arange(len(self.data.train)) if selection is None else selection.indices
        run = self.predict(cell, indices, tokens)
        start = time.perf_counter()
        metrics, per_row = self.evaluate(run)
        record = {
            "name": cell.name,
            "method": cell.method,
            "prune_rate": cell.prune_rate,
            "seed": cell.seed,
            "token_keep": cell.token_keep,
            "n_train": len(self.data.train),
            "coreset_size": 0 if cell.method == ZERO_SHOT else len(indices),
            "metrics": metrics,
            "selection": None if selection is None else selection_summary(selection),
            # Share of the coreset's response tokens trained on (None: no fine-tune).
            "kept_token_fraction": _kept_token_fraction(cell, selection),
            "tokens": None if selection is None else selection.info.get("tokens"),
            "train": run.train_stats,
            "train_seconds": run.train_seconds,
            "eval_seconds": run.generate_seconds + time.perf_counter() - start,
            "nll_seconds": run.nll_seconds,
            "generate_seconds": run.generate_seconds,
            "predictions": run.predictions,
            "per_row": per_row,
            "settings_fp": self.settings_fp,
            "settings": self.settings,
            "code_versions": self.versions(cell),
            "cell_fp": self.cell_fp(cell),
            # The seed of the selection's own fine-tunes (None: no selection).
            "tune_seed": None if selection is None else selection.config.get("tune_seed"),
            # A variant's own settings (another small model...), which `settings` does not show.
            **(
                {"variant": self.cfg.variants[cell.method]}
                if cell.method in self.cfg.variants
                else {}
            ),
            **({"token_settings": self.token_settings} if cell.token_keep < 1 else {}),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        _log_cell(record)
        return record

    def evaluate(self, run: CellRun) -> tuple[dict[str, Any], dict[str, Any]]:
        """The cell's metrics and per-row values: ROUGE-L and BLEU-4 on the rows it generated
        for (``metrics.generate_rows``, the first ones), the reference NLL on every row."""
        if run.predictions:
            refs = self.data.references[: len(run.predictions)]
            return evaluate_rows(run.predictions, refs, self.cfg.metrics, nll=run.nll)
        assert run.nll is not None
        metrics: dict[str, Any] = dict.fromkeys(GENERATED_METRICS)
        metrics.update(nll_metrics(run.nll, self.cfg.metrics), n_eval=0)
        return metrics, {"nll": run.nll.tolist()}

    def select(self, cell: Cell) -> tuple[Selection, TokenSelection | None]:
        """The cell's coreset, and its token masks when ``cell.token_keep < 1``."""
        from ..run.pipeline import select_with_tokens

        assert cell.seed is not None
        cfg = self.cfg.select_config(cell.method, cell.prune_rate, cell.seed, cell.token_keep)
        selection, tokens = select_with_tokens(cfg, pool=self.pool, expect=self.expected_work)
        if (tokens is not None) != (cell.token_keep < 1):
            raise RuntimeError(f"cell {cell.name}: token masks do not match its token_keep")
        # Written before the cell's result: a cell JSON never points at a missing selection.
        folder = self.folder / "selections"
        selection.save(folder / f"{cell.name}.json")
        if tokens is not None:
            tokens.save(folder / f"{cell.name}_tokens")
        return selection, tokens

    def predict(
        self, cell: Cell, indices: np.ndarray, tokens: TokenSelection | None = None
    ) -> CellRun:
        """Zero-shot: generate with the base model. Otherwise a fresh LoRA (seeded with the
        cell's seed) on the target, tuned on the rows at ``indices`` (with ``tokens``' masks:
        dropped tokens get label -100), then generation; the LoRA is detached afterwards,
        whatever happens."""
        from ..models import attach_lora, detach_lora
        from ..train import finetune

        if cell.method == ZERO_SHOT:
            nll, nll_seconds = self.reference_nll(self.base)
            start = time.perf_counter()
            predictions = self.generate(self.base, cell)
            return CellRun(predictions, {}, None, time.perf_counter() - start, nll, nll_seconds)
        assert cell.seed is not None
        settings = TrainSettings(**{**vars(self.cfg.finetune), "seed": cell.seed})
        data = self.train_data(indices, tokens)
        start = time.perf_counter()
        peft = attach_lora(self.base, self.cfg.lora, seed=cell.seed)
        try:
            stats = finetune(
                peft,
                data,
                settings,
                max_batch_tokens=self.cfg.max_batch_tokens,
                desc=f"fine-tune target ({cell.name})",
            )
            trained = time.perf_counter()
            # The reference NLL first: one forward pass per row, much cheaper than generation.
            nll, nll_seconds = self.reference_nll(peft)
            generating = time.perf_counter()
            predictions = self.generate(peft, cell)
        finally:
            self._base = detach_lora(peft)
        return CellRun(
            predictions,
            stats,
            trained - start,
            time.perf_counter() - generating,
            nll,
            nll_seconds,
        )

    def reference_nll(self, model: Any) -> tuple[np.ndarray, float]:
        """Each evaluation row's mean token NLL of its reference under ``model``, and seconds."""
        start = time.perf_counter()
        values = reference_nll_rows(model, self.eval_tokens, self.cfg.max_batch_tokens)
        return values, time.perf_counter() - start

    def train_data(self, indices: np.ndarray, tokens: TokenSelection | None) -> TokenizedData:
        """The target's tokenised rows at ``indices``; with ``tokens``, carrying its masks.

        The masks were made on the selection's own tokenisation of the same rows by the same
        target tokenizer; attaching checks every mask against its row's length.
        """
        if tokens is None:
            return self.train_tokens.subset(indices)
        if not np.array_equal(tokens.indices, indices):
            raise RuntimeError("token masks cover other rows than the coreset")
        data = tokens.attach(self.train_tokens)
        logger.info(
            "fine-tuning on %.1f%% of the coreset's response tokens",
            100 * float(tokens.info.get("kept_fraction", 1.0)),
        )
        return data

    @property
    def generate_rows(self) -> int:
        """How many evaluation rows (the first ones) are generated on."""
        limit = self.cfg.metrics.generate_rows
        n = len(self.data.eval)
        return n if limit is None else min(limit, n)

    def generate(self, model: Any, cell: Cell) -> list[str]:
        g = self.cfg.generation
        if self.generate_rows == 0:  # reference NLL only
            return []
        return generate(
            model,
            self.loaded.tokenizer,
            self.prompts[: self.generate_rows],
            max_new_tokens=g.max_new_tokens,
            batch_size=g.batch_size,
            max_prompt_tokens=self.cfg.prompt_budget,
            truncation_side=self.cfg.data.truncation_side,
            stop=g.stop,
            desc=f"generate ({cell.name})",
        )

    # --- made once, on first use -----------------------------------------------------------

    @property
    def data(self) -> BenchData:
        if self._data is None:
            self._data = prepare_data(self.cfg, write=self.data_to_write)
        return self._data

    @property
    def loaded(self) -> LoadedModel:
        if self._loaded is None:
            m = self.cfg.models
            self._loaded = self.pool.get(m.target, dtype=m.dtype, device=m.device)
            self._base = self._loaded.model
        return self._loaded

    @property
    def base(self) -> Any:
        _ = self.loaded
        return self._base

    @property
    def train_tokens(self) -> TokenizedData:
        if self._train_tokens is None:
            d = self.cfg.data
            self._train_tokens = tokenize_dataset(
                self.data.train,
                self.loaded.tokenizer,
                Formatting.from_config(d),
                d.max_length,
                d.truncation_side,
            )
        return self._train_tokens

    @property
    def eval_tokens(self) -> TokenizedData:
        """The evaluation rows tokenised like the training rows (for the reference NLL)."""
        if self._eval_tokens is None:
            d = self.cfg.data
            self._eval_tokens = tokenize_dataset(
                self.data.eval,
                self.loaded.tokenizer,
                Formatting.from_config(d),
                d.max_length,
                d.truncation_side,
            )
        return self._eval_tokens

    @property
    def prompts(self) -> list[str]:
        if self._prompts is None:
            fmt = Formatting.from_config(self.cfg.data)
            self._prompts = prompt_texts(self.data.eval, fmt, self.loaded.tokenizer)
        return self._prompts


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def prepare_data(cfg: BenchConfig, write: bool = True) -> BenchData:
    """Load (and subset) training and evaluation rows; write the training subset the selections
    read into the bench folder (unless ``write`` is False)."""
    d = cfg.data
    train = load_rows(d.train, d.split, flag="data.train", split_flag="data.split")
    train = take_rows(train, d.train_rows, d.row_sampling, d.data_seed)
    # "validation", the default, names no split of a plain file: only another name is refused.
    eval_split_flag = None if d.eval_split == "validation" else "data.eval_split"
    evaluation = load_rows(d.eval, d.eval_split, flag="data.eval", split_flag=eval_split_flag)
    evaluation = take_rows(evaluation, d.eval_rows, d.row_sampling, d.data_seed)
    references = reference_texts(evaluation, d.reference_fields())
    if d.train_rows is not None and write:  # written once both files are known to be good
        write_rows(Path(cfg.train_path()), train)
    logger.info("bench data: %d training rows, %d evaluation rows", len(train), len(evaluation))
    return BenchData(train, evaluation, references)


def take_rows(
    dataset: datasets.Dataset, n: int | None, sampling: str, seed: int
) -> datasets.Dataset:
    """The first ``n`` rows, or ``n`` rows drawn with ``seed`` (in file order); all if ``n`` is
    None or not smaller than the data."""
    if n is None or n >= len(dataset):
        if n is not None:
            logger.info("asked for %d rows, the data has %d: using all", n, len(dataset))
        return dataset
    if sampling == "first":
        return dataset.select(range(n))
    picked = np.sort(np.random.default_rng(seed).choice(len(dataset), size=n, replace=False))
    return dataset.select(picked.tolist())


def write_rows(path: Path, dataset: datasets.Dataset) -> None:
    """Rows as JSON Lines, atomically (the selections' ``data``)."""
    with atomic_open(path) as f:
        for row in dataset:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def reference_texts(dataset: datasets.Dataset, fields: list[str]) -> list[list[str]]:
    """Every evaluation row's reference answers, one per field in ``fields``."""
    for name in fields:
        if name not in dataset.column_names:
            raise DataError(
                f"evaluation data has no field '{name}' (fields: {', '.join(dataset.column_names)});"
                " check data.references"
            )
    columns = [list(dataset[name]) for name in fields]
    refs: list[list[str]] = []
    for i in range(len(dataset)):
        row = [c[i] for c in columns]
        for name, value in zip(fields, row, strict=True):
            if not isinstance(value, str) or not value.strip():
                raise DataError(
                    f"evaluation row {i}: reference field '{name}' is "
                    f"{'empty' if isinstance(value, str) else type(value).__name__}; every "
                    "row needs text in each data.references field"
                )
        refs.append(row)
    return refs


# ---------------------------------------------------------------------------------------------
# Cells on disk
# ---------------------------------------------------------------------------------------------


def cell_path(folder: Path, name: str) -> Path:
    return folder / "cells" / f"{name}.json"


def load_cells(folder: Path) -> dict[str, dict[str, Any]]:
    """Every finished cell in a bench folder (by name). Files are written atomically, so a
    cell file that exists is complete."""
    cells: dict[str, dict[str, Any]] = {}
    for path in sorted((folder / "cells").glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e}); delete it to rerun the cell") from None
        cells[record["name"]] = record
    return cells


def check_settings(
    cells: dict[str, dict[str, Any]],
    settings: dict[str, Any],
    folder: Path,
    token_settings: dict[str, Any] | None = None,
) -> None:
    """Refuse to mix cells of other settings (another epoch count, data, model...) into one
    table; name what changed. Token cells (token_keep < 1) must also match ``token_settings``
    (the scorer, cross-fitting and ranking of their masks)."""
    fp = fingerprint(settings)
    for name, record in cells.items():
        if record.get("settings_fp") == fp:
            continue
        stored = _flatten(record.get("settings", {}))
        changed = sorted(_diff(stored, _flatten(settings)))
        # Cells written while a throughput-only setting was still fingerprinted stay valid, and
        # so do cells written before a setting existed when it is at its default (which is
        # what those cells did).
        changed = [
            c
            for c in changed
            if c not in _THROUGHPUT_KEYS and not (c not in stored and _at_default(c, settings))
        ]
        if "settings" in record and not changed:
            continue
        raise ConfigError(
            f"bench folder {folder} holds cell {name} made with other settings (changed: "
            f"{', '.join(changed[:6]) or 'unknown'}); use another `out` folder, or delete "
            f"{folder / 'cells'} to start over"
        )
    if token_settings is None:
        return
    for name, record in cells.items():
        if float(record.get("token_keep", 1.0)) >= 1:
            continue
        changed = sorted(_diff(record.get("token_settings", {}), token_settings))
        if changed:
            raise ConfigError(
                f"bench folder {folder} holds token cell {name} made with other token settings "
                f"(changed: {', '.join(changed)}); use another `out` folder, or delete the "
                f"cells named *_tok* in {folder / 'cells'} to rerun them"
            )


_THROUGHPUT_KEYS = {f"{group}.{key}" for group, key in THROUGHPUT_ONLY}


def _at_default(key: str, settings: dict[str, Any]) -> bool:
    """Whether a flattened settings ``key`` holds the value a default bench config gives it."""
    defaults = _flatten(BenchConfig().settings_dict())
    return key in defaults and _flatten(settings).get(key) == defaults[key]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _diff(a: dict[str, Any], b: dict[str, Any]) -> set[str]:
    return {k for k in set(a) | set(b) if a.get(k) != b.get(k)}


def _plan(cfg: BenchConfig) -> dict[str, Any]:
    return {
        "methods": cfg.methods,
        "prune_rates": cfg.prune_rates,
        "seeds": cfg.seeds,
        "token_keeps": cfg.token_keeps,
        "token_methods": cfg.token_methods,
        "variants": cfg.variants,
        "full": cfg.full,
        "zero_shot": cfg.zero_shot,
    }


# ---------------------------------------------------------------------------------------------
# Selection facts for the tables
# ---------------------------------------------------------------------------------------------


def selection_summary(selection: Selection) -> dict[str, Any]:
    """Stage times and small/target agreement of one selection."""
    timings = dict(selection.timings)
    total = timings.pop("total", float(sum(timings.values())))
    agreement = selection.info.get("agreement") or {}
    regions = int(selection.config.get("regions", 0) or 0)
    return {
        "seconds": total,
        "timings": timings,
        "agreement": agreement.get("spearman"),
        "rand_index": verified_rand_index(selection, regions),
        "n_verified": selection.info.get("n_verified"),
        "target_samples_scored": selection.info.get("target_samples_scored"),
    }


def _kept_token_fraction(cell: Cell, selection: Selection | None) -> float | None:
    """Share of the training rows' response tokens the cell's fine-tune used."""
    if cell.method == ZERO_SHOT:
        return None
    tokens = None if selection is None else selection.info.get("tokens")
    return 1.0 if not tokens else float(tokens["kept_fraction"])


def _log_cell(record: dict[str, Any]) -> None:
    m = record["metrics"]
    sel = record["selection"] or {}
    logger.info(
        "cell %s: ROUGE-L %s, BLEU-4 %s, reference NLL %s; selection %.1f s, "
        "fine-tune %.1f s, NLL %.1f s, generation %.1f s",
        record["name"],
        _fmt(m.get("rougeL"), 2),
        _fmt(m.get("bleu4"), 2),
        _fmt(m.get("nll"), 3),
        sel.get("seconds") or 0.0,
        record["train_seconds"] or 0.0,
        record.get("nll_seconds") or 0.0,
        record.get("generate_seconds") or 0.0,
    )
    if float(record.get("token_keep", 1.0)) < 1:
        logger.info(
            "cell %s: trained on %.1f%% of the coreset's response tokens (token_keep %g)",
            record["name"],
            100 * record["kept_token_fraction"],
            record["token_keep"],
        )


REBUILT_NOTE = (
    "_Rebuilt from `results.csv` and `paired.csv` without the cells: the seed-level tests from "
    "each cell's metrics, the models-fixed columns as they were._"
)


def _fmt(value: Any, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def report_only(config: BenchConfig | str | Path, *, plots: bool = True) -> list[Path]:
    """Rewrite ``results.csv``, ``table.md`` and the plots from the finished cells only.

    Stale cells (made by other code or another variant definition) are reported as they
    are, and the table says how many there are. A folder with a ``results.csv`` but no
    cells (results committed without them) is rebuilt from ``results.csv`` and
    ``paired.csv``."""
    from .report import tables_from_results

    cfg = config if isinstance(config, BenchConfig) else load_bench_config(config)
    cells = load_cells(cfg.folder)
    if not cells:
        if (cfg.folder / "results.csv").is_file():
            return tables_from_results(cfg.folder, plots=plots, note=REBUILT_NOTE)
        raise ConfigError(f"no finished cells in {cfg.folder / 'cells'}; run the bench first")
    check_settings(cells, cfg.settings_dict(), cfg.folder, cfg.token_settings())
    stale = BenchRunner(cfg).stale(plan_cells(cfg), cells)
    note: str | None = None
    if stale:
        note = (
            f"_{len(stale)} of {len(cells)} cells are stale (made by older code or another "
            f"variant definition; a run would redo them): {', '.join(sorted(stale))}. They "
            "are reported as they are._"
        )
    return write_reports(cfg.folder, cells, plots=plots, bases=cfg.variant_bases(), note=note)
