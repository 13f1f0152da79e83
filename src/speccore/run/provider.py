"""The :class:`~speccore.selection.base.ScoreProvider` backed by real models.

:class:`ModelProvider` serves a method's :class:`~speccore.selection.base.ModelWork` requests:
it puts the model they name (a :class:`~speccore.run.slot.ModelSlot`, loaded once from a
:class:`~speccore.models.pool.ModelPool`; a bench shares one pool across its cells) in the adapter
state they name, and gets the output through the slot's cached scorer, every key built by
:func:`~speccore.utils.cache.cache_key`. It knows no method: what a method needs is in its
requests, and a new kind of output is registered in :mod:`speccore.scoring.outputs`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING

import numpy as np

from ..config import SelectConfig
from ..data.batches import TokenizedData
from ..models.pool import ModelPool
from ..scoring.outputs import get_output
from ..selection.base import ModelWork, StageTimer
from ..utils.cache import ScoreCache
from ..utils.errors import ConfigError
from .slot import ModelSlot, snapshot_file, snapshot_folder

if TYPE_CHECKING:
    import datasets


class ModelProvider:
    """Scores of the data on the small and target models, computed on demand and cached.

    ``pool`` shares loaded models with other providers (a bench's cells); :meth:`close`
    detaches this provider's adapters from them.
    """

    def __init__(
        self,
        cfg: SelectConfig,
        dataset: datasets.Dataset,
        pool: ModelPool | None = None,
        declared: Collection[ModelWork] | None = None,
        expect: Collection[ModelWork] = (),
    ) -> None:
        self.config = cfg
        # The work the run's method declared (None: any, as for a dry run); a method asking for
        # other work is a bug. A fine-tune keeps snapshots only where some declared or expected
        # work (a bench's later cells on the same cache) reads it at checkpoints.
        self.declared = None if declared is None else frozenset(declared)
        self.expected = frozenset(expect) | (self.declared or frozenset())
        self.rows_scored: dict[str, int] = {}
        self.dataset = dataset
        self.n = len(dataset)
        self.timer = StageTimer()
        self.cache = ScoreCache(cfg.cache_dir, enabled=not cfg.no_cache)
        self.pool = pool if pool is not None else ModelPool()
        self._small: ModelSlot | None = None
        self._target: ModelSlot | None = None
        self._family_checked = False

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        with self.timer.stage(name):
            yield

    def close(self) -> None:
        for slot in self.loaded_slots:
            slot.release()

    def __enter__(self) -> ModelProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def small(self) -> ModelSlot:
        if self._small is None:
            if not self.config.small:
                raise ConfigError(f"--small is required for method {self.config.method!r}")
            self._small = self._slot("small", self._small_name(), self.config.small_adapter)
        return self._small

    def _small_name(self) -> str:
        """``--small``, or for ``derive:…`` the folder of the model derived from the target on
        the run's rows (cached; the derivation and its healing are the "small derive" stage)."""
        from ..proxies.derive import is_derive_spec, resolve_derived

        name = str(self.config.small)
        if not is_derive_spec(name):
            return name
        cfg = self.config
        with self.timer.stage("small derive"):
            # The target by name: derive loads a plain copy (no LoRA, no quantisation).
            folder = resolve_derived(
                name,
                str(cfg.target),
                self.target.data,
                dtype=cfg.dtype,
                device=cfg.device,
                max_batch_tokens=self.target.batch_tokens,
            )
        return str(folder)

    @property
    def target(self) -> ModelSlot:
        if self._target is None:
            if not self.config.target:
                raise ConfigError(f"--target is required for method {self.config.method!r}")
            self._target = self._slot("target", self.config.target, None)
        return self._target

    def _slot(self, role: str, name: str, adapter: str | None) -> ModelSlot:
        snapshots = any(w.model == role and w.checkpoints > 1 for w in self.expected)
        return ModelSlot(
            role,
            name,
            self.config,
            self.dataset,
            self.timer,
            self.cache,
            adapter,
            self.pool,
            keep_snapshots=snapshots,
        )

    def _check_family(self) -> None:
        """Where the method works with both models, warn once if their tokenizers differ (both
        load at its first request, so the warning comes before any long work)."""
        if self._family_checked:
            return
        roles = {w.model for w in self.declared or ()}
        if roles != {"small", "target"} and (self._small is None or self._target is None):
            return  # checked once both are in use
        small, target = self.small, self.target
        from ..models import check_family

        self._family_checked = True
        check_family(small.loaded.tokenizer, target.loaded.tokenizer, small.name, target.name)

    def get(self, work: ModelWork, rows: np.ndarray | None = None) -> np.ndarray:
        """Serve one request of the method's :class:`~speccore.selection.base.ModelWork`:
        the model in the adapter state it names, its output through the cache."""
        self._check_declared(work)
        slot = self.slot(work.model)
        self._check_family()
        output = get_output(work.output)
        if work.checkpoints > 1:
            return self._at_checkpoints(slot, work)
        self._use(slot, work.tuned)
        if output.vector:
            return slot.scorer.vectors(work.output, work.stage)
        if work.some_rows:
            if rows is None:
                raise ValueError(f"{work} names its rows per call: pass rows")
            self.rows_scored[work.model] = self.rows_scored.get(work.model, 0) + len(rows)
            return slot.score_some(work.output, np.asarray(rows, dtype=np.int64), work.stage)
        return slot.score_all(work.output, work.stage)

    def fine_tune_steps(self, model: str) -> int:
        slot = self.slot(model)
        return slot.fine_tune_steps(self._epochs(model))

    def slot(self, model: str) -> ModelSlot:
        """The small or the target model's slot."""
        if model not in ("small", "target"):
            raise ValueError(f"model must be 'small' or 'target', got {model!r}")
        return self.small if model == "small" else self.target

    def _epochs(self, model: str) -> float:
        return self.config.small_epochs if model == "small" else self.config.target_epochs

    def _use(self, slot: ModelSlot, tuned: bool) -> None:
        if tuned:
            slot.use_tuned(self._epochs(slot.role))
        elif slot.adapter_path is not None:
            raise ConfigError(
                f"the untuned {slot.role} model is not available with --small-adapter; leave "
                "it out or ask for the tuned model"
            )
        else:
            slot.use_fresh()

    def _check_declared(self, work: ModelWork) -> None:
        """A method asks only for the work it declared (its plan and the dry run rely on it)."""
        if self.declared is not None and work not in self.declared:
            raise RuntimeError(
                f"method {self.config.method!r} asked for {work}, which its requests() does "
                "not declare"
            )

    def _at_checkpoints(self, slot: ModelSlot, work: ModelWork) -> np.ndarray:
        """``work.output`` of every sample at C evenly spaced checkpoints of the fine-tune
        (:mod:`speccore.selection.checkpoints`): the untuned start, LoRA snapshots the fine-tune
        saved, and the tuned adapter. Each column is a cached, resumable scoring pass; the
        assembled [N, C] array is cached under the tuned adapter."""
        from ..selection.checkpoints import checkpoint_steps

        epochs = self._epochs(slot.role)
        if slot.adapter_path is not None or epochs <= 0:
            raise ConfigError(
                f"checkpoints of the {slot.role} fine-tune need its own fine-tune: "
                f"--{slot.role}-epochs > 0 and no --small-adapter"
            )
        slot.use_tuned(epochs)  # fine-tunes once, saving the snapshots, or loads the adapter
        n_steps = slot.fine_tune_steps(epochs)
        steps = checkpoint_steps(n_steps, work.checkpoints)
        key = slot.key(
            "checkpoints",
            adapter=slot.adapter_fp(),
            scorer=work.output,
            extra=(steps, n_steps),
        )
        cached = self.cache.get_full(key) if self.cache.enabled else None
        if cached is not None:
            return cached
        assert slot.tuned_adapter_dir is not None
        snapshots = snapshot_folder(slot.tuned_adapter_dir)
        inner = sorted({s for s in steps if 0 < s < n_steps})
        if not all(snapshot_file(snapshots, s).exists() for s in inner):
            slot.record_snapshots(epochs)
        column = {n_steps: slot.score_all(work.output, work.stage)}
        for s in inner:
            slot.use_snapshot(snapshot_file(snapshots, s))
            column[s] = slot.score_all(work.output, work.stage)
        slot.use_fresh()  # the untuned start, checkpoint 0
        column[0] = slot.score_all(work.output, work.stage)
        values = np.column_stack([column[s] for s in steps])
        self.cache.put_full(key, values)
        return values

    @property
    def loaded_slots(self) -> list[ModelSlot]:
        """The model slots a method has used so far (small first)."""
        return [s for s in (self._small, self._target) if s is not None]

    def tokenized(self) -> TokenizedData | None:
        """The tokenised data of whichever model was used (small first), for reports."""
        for slot in self.loaded_slots:
            if slot.has_data:
                return slot.data
        return None
