"""The :class:`~speccore.selection.base.ScoreProvider` backed by real models.

It loads each model once, lets each tokenise the text itself (the small and target tokenizers
may differ), LoRA-tunes only when a method asks for a tuned model, and caches adapters and
scores on disk so that another pruning rate, K, b_v or seed costs no model work.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .cache import ScoreCache
from .config import SelectConfig
from .data import Formatting, tokenize_dataset
from .data.tokenized import TokenizedData
from .errors import ConfigError, DataError
from .io import fingerprint, load_npz
from .selection.base import StageTimer

if TYPE_CHECKING:
    import datasets
    from peft import PeftModel

    from .models import LoadedModel

logger = logging.getLogger(__name__)


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
    ) -> None:
        self.role, self.name, self.cfg = role, name, cfg
        self.dataset, self.timer, self.cache = dataset, timer, cache
        self.adapter_path = adapter_path
        self._loaded: LoadedModel | None = None
        self._data: TokenizedData | None = None
        self._peft: PeftModel | None = None
        self._fresh_state: dict[str, Any] | None = None
        self.state = "fresh"
        self.tuned_adapter_dir: Path | None = None

    @property
    def loaded(self) -> LoadedModel:
        if self._loaded is None:
            from .models import load_model

            with self.timer.stage(f"{self.role} load"):
                self._loaded = load_model(self.name, dtype=self.cfg.dtype, device=self.cfg.device)
        return self._loaded

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
    def peft(self) -> PeftModel:
        """The model with its LoRA adapter (fresh, or the user's ``--small-adapter``)."""
        if self._peft is None:
            from peft import get_peft_model_state_dict

            from .models import attach_lora, load_adapter

            if self.adapter_path:
                self._peft = load_adapter(self.loaded.model, self.adapter_path)
                self.state = "user"
            else:
                self._peft = attach_lora(self.loaded.model, self.cfg.lora, seed=self.cfg.tune_seed)
            self._fresh_state = {
                k: v.detach().clone() for k, v in get_peft_model_state_dict(self._peft).items()
            }
        return self._peft

    def identity(self) -> str:
        return self.loaded.source.identity

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
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from .models import save_adapter
        from .train import finetune

        data = self.data if rows is None else self.data.subset(rows)
        settings = self.cfg.train_settings(epochs)
        key = fingerprint(
            "adapter", self.identity(), data.fingerprint(), vars(self.cfg.lora), vars(settings)
        )
        folder = self.cache.adapter_dir(key)
        if self.state == f"tuned:{key}":
            return model
        self.use_fresh()
        if (folder / "adapter_model.safetensors").exists():
            logger.info("%s adapter from cache: %s", self.role, folder)
            set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        else:
            # Cross-fit halves get a stage of their own: the overhead table must not read as
            # a second STAFF fine-tune.
            stage = f"{self.role} fine-tune" if rows is None else "token cross-fit fine-tune"
            with self.timer.stage(stage):
                finetune(
                    model,
                    data,
                    settings,
                    max_batch_tokens=self.cfg.max_batch_tokens,
                    desc=f"fine-tune {self.role}"
                    + ("" if rows is None else f" on {len(rows)} rows"),
                )
            save_adapter(model, folder)
        self.state = f"tuned:{key}"
        if rows is None:
            self.tuned_adapter_dir = folder
        return model

    def adapter_fp(self) -> str:
        from .models import adapter_fingerprint

        return adapter_fingerprint(self.peft)

    def score_key(self, score: str) -> str:
        return fingerprint(
            "scores", self.identity(), self.adapter_fp(), self.data.fingerprint(), score
        )

    def score_all(self, score: str, stage: str) -> np.ndarray:
        """``score`` of every sample under the adapter in use (cached; resumable)."""
        key = self.score_key(score)
        cached = self.cache.get_full(key)
        if cached is not None:
            return cached
        with self.timer.stage(stage):
            values = self._run_scoring(score, None, self.cache.checkpoint_path(key))
        self.cache.put_full(key, values)
        return values

    def score_some(self, score: str, indices: np.ndarray, stage: str) -> np.ndarray:
        """``score`` of the samples at ``indices``; only samples not cached are computed."""
        key = self.score_key(score)
        known = self.cache.get_partial(key)
        missing = np.array([i for i in indices.tolist() if i not in known], dtype=np.int64)
        if len(missing):
            with self.timer.stage(stage):
                values = self._run_scoring(score, missing, None)
            known.update(zip(missing.tolist(), values.tolist(), strict=True))
            self.cache.put_partial(key, known)
        return np.array([known[i] for i in indices.tolist()], dtype=np.float64)

    def _run_scoring(
        self, score: str, indices: np.ndarray | None, checkpoint: Path | None
    ) -> np.ndarray:
        if self.cfg.engine == "ray":
            from .scoring.ray_engine import score_with_ray

            return score_with_ray(self, score, indices)
        from .scoring import score_samples

        return score_samples(
            self.peft,
            self.data,
            score,
            indices=indices,
            max_batch_tokens=self.cfg.max_batch_tokens,
            checkpoint=checkpoint,
            desc=f"{score} on {self.role}",
        )

    def embeddings(self, stage: str) -> np.ndarray:
        from .scoring import embed_samples

        key = self.score_key("embedding")
        cached = self.cache.get_full(key)
        if cached is not None:
            return cached
        with self.timer.stage(stage):
            values = embed_samples(
                self.peft,
                self.data,
                max_batch_tokens=self.cfg.max_batch_tokens,
                desc=f"embed {self.role}",
            )
        self.cache.put_full(key, values)
        return values


class TargetVerifier:
    """The untuned target, scoring only the samples STAFF asks about; counts them."""

    def __init__(self, slot: ModelSlot, score: str) -> None:
        self.slot, self.score = slot, score
        self.n_asked = 0

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        self.n_asked += len(indices)
        self.slot.use_fresh()
        return self.slot.score_some(
            self.score, np.asarray(indices, dtype=np.int64), "target verification"
        )


class ModelProvider:
    """Scores of the data on the small and target models, computed on demand and cached."""

    def __init__(self, cfg: SelectConfig, dataset: datasets.Dataset) -> None:
        self.config = cfg
        self.dataset = dataset
        self.n = len(dataset)
        self.timer = StageTimer()
        self.cache = ScoreCache(cfg.cache_dir)
        self._small: ModelSlot | None = None
        self._target: ModelSlot | None = None
        self.verifications: list[TargetVerifier] = []
        self._family_checked = False

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        with self.timer.stage(name):
            yield

    @property
    def small(self) -> ModelSlot:
        if self._small is None:
            if not self.config.small:
                raise ConfigError(f"--small is required for method {self.config.method!r}")
            self._small = ModelSlot(
                "small",
                self.config.small,
                self.config,
                self.dataset,
                self.timer,
                self.cache,
                adapter_path=self.config.small_adapter,
            )
        self._check_family()
        return self._small

    @property
    def target(self) -> ModelSlot:
        if self._target is None:
            if not self.config.target:
                raise ConfigError(f"--target is required for method {self.config.method!r}")
            self._target = ModelSlot(
                "target", self.config.target, self.config, self.dataset, self.timer, self.cache
            )
        self._check_family()
        return self._target

    def _check_family(self) -> None:
        if self._family_checked or self._small is None or self._target is None:
            return
        from .models import check_family

        self._family_checked = True
        check_family(
            self._small.loaded.tokenizer,
            self._target.loaded.tokenizer,
            self._small.name,
            self._target.name,
        )

    def small_scores(self) -> np.ndarray:
        if self.config.scores:
            return load_scores_file(self.config.scores, self.n)
        slot = self.small
        slot.use_tuned(self.config.small_epochs)
        return slot.score_all(self.config.score, "small scoring")

    def verifier(self) -> TargetVerifier:
        if self.config.small and self.config.target and not self.config.scores:
            _ = self.small  # load both so the family check runs before verification
        verifier = TargetVerifier(self.target, self.config.score)
        self.verifications.append(verifier)
        return verifier

    def target_scores(self, score: str, tuned: bool) -> np.ndarray:
        slot = self.target
        if tuned:
            slot.use_tuned(self.config.target_epochs)
        else:
            slot.use_fresh()
        return slot.score_all(score, "target scoring")

    def target_embeddings(self) -> np.ndarray:
        slot = self.target
        slot.use_tuned(self.config.target_epochs)
        return slot.embeddings("target embeddings")

    @property
    def loaded_slots(self) -> list[ModelSlot]:
        """The model slots a method has used so far (small first)."""
        return [s for s in (self._small, self._target) if s is not None]

    def tokenized(self) -> TokenizedData | None:
        """The tokenised data of whichever model was used (small first), for reports."""
        for slot in (self._small, self._target):
            if slot is not None and slot._data is not None:
                return slot._data
        return None


def load_scores_file(path: str, n: int) -> np.ndarray:
    """Precomputed speculative scores: ``.npy``, ``.npz`` (first array or ``scores``) or a JSON
    list. Never unpickled."""
    import json

    p = Path(path)
    if not p.exists():
        raise DataError(f"--scores: file not found: {path}")
    try:
        if p.suffix == ".npy":
            values = np.load(p, allow_pickle=False)
        elif p.suffix == ".npz":
            arrays = load_npz(p)
            values = arrays.get("scores", next(iter(arrays.values())))
        else:
            values = np.asarray(json.loads(p.read_text(encoding="utf-8")), dtype=np.float64)
    except (ValueError, json.JSONDecodeError, StopIteration) as err:
        raise DataError(f"--scores: cannot read {path}: {err}") from None
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(values) != n:
        raise DataError(f"--scores: {path} holds {len(values)} scores but the data has {n} rows")
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise DataError(
            f"--scores: score of row {int(bad[0])} is {values[bad[0]]}; scores must be finite"
        )
    return values
