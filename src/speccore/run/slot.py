"""One model on the data: :class:`ModelSlot` holds a model (from the pool) with one LoRA adapter,
swapped between the fresh (untuned) state, tuned ones (cached adapters) and snapshots of a
fine-tune; :class:`CachedScorer` gets its scores from the cache or computes them with an engine
(the local batch loop or Ray, each taking a plain
:class:`~speccore.scoring.request.ScoringRequest`) and stores them."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import SelectConfig, TrainSettings
from ..data import Formatting, tokenize_dataset
from ..data.batches import TokenizedData
from ..models.pool import ModelPool
from ..scoring.request import ScoringRequest
from ..selection.base import StageTimer
from ..utils.cache import ScoreCache, cache_key, model_identity
from ..utils.io import atomic_path

if TYPE_CHECKING:
    import datasets
    from peft import PeftModel

    from ..models import LoadedModel


logger = logging.getLogger(__name__)

Engine = Callable[[ScoringRequest], np.ndarray]


def local_engine(request: ScoringRequest) -> np.ndarray:
    """Scores from the in-process batch loop."""
    from ..scoring import score_samples

    return score_samples(
        request.model,
        request.data,
        request.scorer,
        indices=request.indices,
        max_batch_tokens=request.max_batch_tokens,
        checkpoint=request.checkpoint,
        checkpoint_seconds=request.checkpoint_seconds,
        desc=request.desc,
    )


def ray_engine(request: ScoringRequest) -> np.ndarray:
    """Scores from a Ray actor pool (see :mod:`speccore.scoring.ray_engine`)."""
    from ..scoring.ray_engine import score_with_ray

    return score_with_ray(request)


ENGINES: dict[str, Engine] = {"local": local_engine, "ray": ray_engine}


class ModelSlot:
    """One model (``small`` or ``target``) on the data, with one LoRA adapter whose weights
    are swapped between the fresh (untuned) state and a tuned one as methods ask."""

    def __init__(
        self,
        role: str,
        name: str,
        cfg: SelectConfig,
        dataset: datasets.Dataset,
        timer: StageTimer,
        cache: ScoreCache,
        adapter_path: str | None = None,
        pool: ModelPool | None = None,
        keep_snapshots: bool = False,
    ) -> None:
        self.role, self.name, self.cfg = role, name, cfg
        self.keep_snapshots = keep_snapshots
        self.dataset, self.timer, self.cache = dataset, timer, cache
        self.adapter_path = adapter_path
        self.pool = pool if pool is not None else ModelPool()
        self._loaded: LoadedModel | None = None
        self._batch_tokens: int | None = None
        self._data: TokenizedData | None = None
        self._peft: PeftModel | None = None
        self._fresh_state: dict[str, Any] | None = None
        self.state = "fresh"
        self.tuned_adapter_dir: Path | None = None
        self.scorer = CachedScorer(self)

    # --- lifecycle ----------------------------------------------------------------------

    @property
    def loaded(self) -> LoadedModel:
        if self._loaded is None:
            with self.timer.stage(f"{self.role} load"):
                self._loaded = self.pool.get(
                    self.name,
                    role=self.role,
                    dtype=self.cfg.dtype,
                    device=self.cfg.device,
                    **self._load_options(),
                )
        return self._loaded

    def _load_options(self) -> dict[str, Any]:
        # Quantised weights and device maps serve the models that are only scored: the small
        # model (QLoRA-style tuning works on them too) and the target's verification.
        return {"load_in": self.cfg.load_in, "device_map": self.cfg.device_map}

    @property
    def batch_tokens(self) -> int:
        """Padded tokens per forward (``--max-batch-tokens``; 0: from free GPU memory, sized once
        per slot so that every pass of the run batches alike)."""
        if self._batch_tokens is None:
            from ..train.batching import resolve_batch_tokens

            self._batch_tokens = resolve_batch_tokens(self.cfg.max_batch_tokens, self.loaded.model)
        return self._batch_tokens

    @property
    def is_loaded(self) -> bool:
        return self._loaded is not None

    @property
    def data(self) -> TokenizedData:
        if self._data is None:
            with self.timer.stage("tokenize"):
                self._data = tokenize_dataset(
                    self.dataset,
                    self.loaded.tokenizer,
                    Formatting.from_config(self.cfg),
                    self.cfg.max_length,
                    self.cfg.truncation_side,
                )
        return self._data

    @property
    def has_data(self) -> bool:
        return self._data is not None

    @property
    def peft(self) -> PeftModel:
        """The model with its LoRA adapter (fresh, or the user's ``--small-adapter``)."""
        if self._peft is None:
            from peft import get_peft_model_state_dict

            from ..models import attach_lora, load_adapter

            if self.adapter_path:
                self._peft = load_adapter(self.loaded.model, self.adapter_path)
                self.state = "user"
            else:
                self._peft = attach_lora(self.loaded.model, self.cfg.lora, seed=self.cfg.tune_seed)
            if self.cfg.gradient_checkpointing:
                from ..models.lora import enable_gradient_checkpointing

                enable_gradient_checkpointing(self._peft)
            if self.cfg.compile:
                from ..models.speed import compile_forward

                compile_forward(self._peft)
            self._fresh_state = {
                k: v.detach().clone() for k, v in get_peft_model_state_dict(self._peft).items()
            }
        return self._peft

    def release(self) -> None:
        """Detach the LoRA from the (possibly pooled) model: it is pretrained again."""
        if self._peft is not None:
            from ..models import detach_lora

            if self.cfg.gradient_checkpointing:
                from ..models.lora import disable_gradient_checkpointing

                disable_gradient_checkpointing(self._peft)
            from ..models.speed import uncompile_forward

            uncompile_forward(self._peft)
            detach_lora(self._peft)
            self._peft = None
            self._fresh_state = None
            self.state = "fresh"

    # --- adapter state ------------------------------------------------------------------

    def identity(self) -> str:
        return model_identity(self.loaded)

    def key(self, kind: str, **parts: Any) -> str:
        """A cache key of a value computed by this model on its data (see :func:`cache_key`)."""
        model = self.loaded.model
        return cache_key(
            kind,
            model=self.identity(),
            dtype=str(getattr(model, "dtype", "")),
            device=_device_type(model),
            data=self.data.fingerprint(),
            **parts,
        )

    def use_fresh(self) -> PeftModel:
        """The untuned model: a fresh LoRA of the configured shape (B = 0: the base model)."""
        model = self.peft
        if self.state != "fresh" and self.adapter_path is None:
            from peft import set_peft_model_state_dict

            assert self._fresh_state is not None
            set_peft_model_state_dict(model, self._fresh_state)
            self.state = "fresh"
        return model

    def use_tuned(self, epochs: float, rows: np.ndarray | None = None) -> PeftModel:
        """The model LoRA-tuned for ``epochs`` on the full data, or on ``rows`` only (token
        cross-fitting); the adapter comes from the cache when it was tuned before."""
        model = self.peft
        if self.adapter_path is not None and rows is None:
            return model  # the user's adapter is the tuned state
        settings = self.cfg.train_settings(epochs)
        key = self.key(
            "adapter",
            scorer="adapter",
            extra=(
                vars(self.cfg.lora),
                vars(settings),
                None if rows is None else np.asarray(rows).tolist(),
            ),
        )
        folder = self.cache.adapter_dir(key)
        if self.state == f"tuned:{key}":
            return model
        self.use_fresh()
        with self.cache.lock(key, f"the {self.role} model's adapter"):
            self._tune_or_load(model, key, folder, settings, rows)
        self.state = f"tuned:{key}"
        if rows is None:
            self.tuned_adapter_dir = folder
        return model

    def _tune_or_load(
        self,
        model: PeftModel,
        key: str,
        folder: Path,
        settings: TrainSettings,
        rows: np.ndarray | None,
    ) -> None:
        """The cached adapter ``key``, or a fine-tune that caches it (under its lock)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from ..models import save_adapter
        from ..train import finetune

        if self.cache.enabled and self.cache.has_adapter(key):
            logger.info("%s adapter from cache: %s", self.role, folder)
            set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        else:
            data = self.data if rows is None else self.data.subset(rows)
            # Cross-fit halves get a stage of their own: the overhead table must not read as
            # a second STAFF fine-tune.
            stage = f"{self.role} fine-tune" if rows is None else "token cross-fit fine-tune"
            with self.timer.stage(stage):
                stats = finetune(
                    model,
                    data,
                    settings,
                    max_batch_tokens=self.batch_tokens,
                    desc=f"fine-tune {self.role}"
                    + ("" if rows is None else f" on {len(rows)} rows"),
                    on_step=self._snapshot_hook(folder, data, settings) if rows is None else None,
                    checkpoint=self.cache.finetune_checkpoint(key),
                    checkpoint_seconds=self.cfg.checkpoint_seconds,
                )
            self.timer.count(stage, stats["tokens"], stats["padded_tokens"])
            save_adapter(model, folder)
            shutil.rmtree(self.cache.finetune_checkpoint(key), ignore_errors=True)

    def count_scored(self, stage: str, indices: np.ndarray | None) -> None:
        """Add the tokens (real and padded) of scoring ``indices`` (None: all rows) to
        ``stage``'s count, as the runner batches them."""
        from ..data.batches import length_grouped_batches
        from ..train.batching import padded_tokens

        lengths = self.data.lengths
        idx = np.arange(len(lengths)) if indices is None else np.asarray(indices)
        batches = length_grouped_batches(lengths, self.batch_tokens, indices=idx)
        self.timer.count(stage, *padded_tokens(lengths, batches))

    def adapter_fp(self) -> str:
        from ..models import adapter_fingerprint

        return adapter_fingerprint(self.peft)

    # --- scores (through the cache) -----------------------------------------------------

    def score_all(self, score: str, stage: str) -> np.ndarray:
        """``score`` of every sample under the adapter in use (cached; resumable)."""
        return self.scorer.all(score, stage)

    def score_some(self, score: str, indices: np.ndarray, stage: str) -> np.ndarray:
        """``score`` of the samples at ``indices``; only samples not cached are computed."""
        return self.scorer.some(score, indices, stage)

    def request(
        self, score: str, key: str, indices: np.ndarray | None, checkpoint: Path | None
    ) -> ScoringRequest:
        """A plain scoring request for an engine, under the adapter in use."""
        from ..models import save_adapter

        return ScoringRequest(
            model=self.peft,
            model_name=self.name,
            dtype=self.cfg.dtype,
            device=self.cfg.device,
            save_adapter=lambda folder: save_adapter(self.peft, folder),
            adapter_fp=self.adapter_fp(),
            data=self.data,
            scorer=score,
            key=key,
            work_dir=self.cache.work_dir(key),
            max_batch_tokens=self.batch_tokens,
            indices=indices,
            checkpoint=checkpoint,
            checkpoint_seconds=self.cfg.checkpoint_seconds,
            desc=f"{score} on {self.role}",
        )

    # --- checkpoints: snapshots of the fine-tune -----------------------------------------

    def _snapshot_hook(
        self, folder: Path, data: TokenizedData, settings: TrainSettings
    ) -> Callable[[int], None] | None:
        """Where some requested work reads this model's fine-tune at checkpoints, the fine-tune
        saves its LoRA weights at every inner grid step
        (:func:`~speccore.selection.checkpoints.snapshot_steps`) beside its cached adapter, so
        that any number of checkpoints is served later without a second fine-tune."""
        if not self.keep_snapshots:
            return None
        from ..selection.checkpoints import snapshot_steps
        from ..train import plan_steps

        wanted = set(snapshot_steps(len(plan_steps(data.lengths, settings))))
        snapshots = snapshot_folder(folder)
        model = self.peft

        def on_step(step: int) -> None:
            if step in wanted:
                save_snapshot(model, snapshot_file(snapshots, step))

        return on_step

    def fine_tune_steps(self, epochs: float) -> int:
        """Optimizer steps of this model's full-data fine-tune of ``epochs`` epochs."""
        from ..train import plan_steps

        return len(plan_steps(self.data.lengths, self.cfg.train_settings(epochs)))

    def use_snapshot(self, path: Path) -> PeftModel:
        """The model under a LoRA snapshot saved during its fine-tune."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        model = self.use_fresh()
        set_peft_model_state_dict(model, load_file(str(path)))
        self.state = f"snapshot:{path}"
        return model

    def record_snapshots(self, epochs: float) -> None:
        """Write the snapshots a cached tuned adapter lacks (one tuned before speccore kept
        them): fine-tune again from the fresh adapter, then go back to the cached adapter."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from ..train import finetune

        folder, state = self.tuned_adapter_dir, self.state
        assert folder is not None and state.startswith("tuned:")
        logger.warning(
            "%s adapter %s has no training snapshots: fine-tuning again to record them",
            self.role,
            folder,
        )
        settings = self.cfg.train_settings(epochs)
        model = self.use_fresh()
        with self.timer.stage(f"{self.role} fine-tune"):
            stats = finetune(
                model,
                self.data,
                settings,
                max_batch_tokens=self.batch_tokens,
                desc=f"fine-tune {self.role} (snapshots)",
                on_step=self._snapshot_hook(folder, self.data, settings),
            )
        self.timer.count(f"{self.role} fine-tune", stats["tokens"], stats["padded_tokens"])
        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        self.state = state


class CachedScorer:
    """Scores of one model slot: from the cache, or computed by the configured engine and
    stored."""

    def __init__(self, slot: ModelSlot) -> None:
        self.slot = slot

    def key(self, score: str) -> str:
        return self.slot.key("scores", adapter=self.slot.adapter_fp(), scorer=score)

    def _engine(self) -> Engine:
        return ENGINES[self.slot.cfg.engine]

    def all(self, score: str, stage: str) -> np.ndarray:
        """``score`` of every sample (cached; resumable through its checkpoint)."""
        slot, key = self.slot, self.key(score)

        def compute() -> np.ndarray:
            request = slot.request(score, key, None, slot.cache.checkpoint_path(key))
            return self._engine()(request)

        return self._full(key, f"{score} scores on the {slot.role} model", stage, compute)

    def _full(
        self, key: str, what: str, stage: str, compute: Callable[[], np.ndarray]
    ) -> np.ndarray:
        """The value of every sample under ``key``: from the cache, or computed under the
        entry's lock (read again first: another process may have computed it meanwhile)."""
        slot, cache = self.slot, self.slot.cache
        cached = cache.get_full(key) if cache.enabled else None
        if cached is not None:
            return cached
        with cache.lock(key, what):
            cached = cache.get_full(key) if cache.enabled else None
            if cached is not None:
                return cached
            with slot.timer.stage(stage):
                values = compute()
            slot.count_scored(stage, None)
            cache.put_full(key, values)
        return values

    def some(self, score: str, indices: np.ndarray, stage: str) -> np.ndarray:
        slot, cache = self.slot, self.slot.cache
        key = self.key(score)
        known = cache.get_partial(key) if cache.enabled else {}
        if any(i not in known for i in indices.tolist()):
            with cache.lock(key, f"{score} scores of some samples on the {slot.role} model"):
                known = self._add_missing(score, key, indices, stage)
        return np.array([known[i] for i in indices.tolist()], dtype=np.float64)

    def _add_missing(
        self, score: str, key: str, indices: np.ndarray, stage: str
    ) -> dict[int, float]:
        """The cached scores under ``key`` with those of ``indices`` added (under its lock:
        read again, as another process may have added some)."""
        slot, cache = self.slot, self.slot.cache
        known = cache.get_partial(key) if cache.enabled else {}
        missing = np.array([i for i in indices.tolist() if i not in known], dtype=np.int64)
        if len(missing):
            logger.info(
                "scoring %s of %d samples on the %s model (%d already in the cache)",
                score,
                len(missing),
                slot.role,
                len(indices) - len(missing),
            )
            checkpoint = cache.partial_checkpoint_path(key)
            with slot.timer.stage(stage):
                values = self._engine()(slot.request(score, key, missing, checkpoint))
            slot.count_scored(stage, missing)
            known.update(zip(missing.tolist(), values.tolist(), strict=True))
            cache.put_partial(key, known)
            checkpoint.unlink(missing_ok=True)
        return known

    def vectors(self, output: str, stage: str) -> np.ndarray:
        """A vector output (embeddings) of every sample, cached."""
        from ..scoring import embed_samples

        slot = self.slot

        def compute() -> np.ndarray:
            return embed_samples(
                slot.peft,
                slot.data,
                max_batch_tokens=slot.batch_tokens,
                desc=f"{output} on {slot.role}",
                output=output,
            )

        return self._full(self.key(output), f"{output} on the {slot.role} model", stage, compute)


def snapshot_folder(adapter_folder: Path) -> Path:
    """Where a fine-tune's LoRA snapshots live: beside its adapter folder (``save_adapter``
    replaces that folder as a whole), ``<adapter>.snapshots``."""
    return adapter_folder.with_name(adapter_folder.name + ".snapshots")


def snapshot_file(folder: Path, step: int) -> Path:
    return folder / f"step-{step:07d}.safetensors"


def save_snapshot(model: Any, path: Path) -> None:
    """The LoRA weights of ``model`` (as ``save_pretrained`` keys them), atomically."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = {
        k: v.detach().to("cpu", copy=True).contiguous()
        for k, v in get_peft_model_state_dict(model).items()
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def _device_type(model: Any) -> str:
    try:
        return next(model.parameters()).device.type
    except (StopIteration, AttributeError):
        return "cpu"
