"""Shared fixtures: tiny model folders (random weights, offline tokenizers) and small data."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from speccore import SelectConfig
from speccore.data.batches import TokenizedData
from speccore.models.tiny import tiny_model_folder

WORDS = (  # noqa: SIM905
    "the report describes sales costs and the plan for next year while the team "
    "travels to Berlin and Hamburg to meet the customers about the new contract"
).split()


def make_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` rows with varied prompt and response lengths and a topic."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
        rows.append({"dialogue": f"#{i} {prompt}", "summary": answer, "topic": f"t{i % 3}"})
    return rows


def tiny_select_config(data: Path, dirs: dict[str, Path], **overrides: object) -> SelectConfig:
    """A SelectConfig for the tiny models on ``make_rows`` data; ``overrides`` win."""
    settings: dict[str, object] = dict(
        data=str(data),
        input_field="dialogue",
        output_field="summary",
        small=str(dirs["small"]),
        target=str(dirs["target"]),
        prune_rate=0.5,
        regions=3,
        verify_per_region=2,
        small_epochs=1,
        batch_size=4,
        max_length=64,
        group_field="topic",
    )
    settings.update(overrides)
    return SelectConfig.from_dict(settings)


class ModelWorkSpy:
    """Counts fine-tunes (their row counts) and scored samples, calling the real functions."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import speccore.scoring as scoring
        import speccore.train as train

        self.finetunes: list[int] = []
        self.scored: list[int] = []
        real_finetune, real_score = train.finetune, scoring.score_samples

        def finetune(model, data, settings, **kw):  # type: ignore[no-untyped-def]
            self.finetunes.append(len(data))
            return real_finetune(model, data, settings, **kw)

        def score_samples(model, data, score, **kw):  # type: ignore[no-untyped-def]
            out = real_score(model, data, score, **kw)
            self.scored.append(len(out))
            return out

        monkeypatch.setattr(train, "finetune", finetune)
        monkeypatch.setattr(scoring, "score_samples", score_samples)


class ArrayProvider:
    """A :class:`~speccore.selection.base.ScoreProvider` of plain arrays: a method's model work
    is answered from ``outputs`` (a ModelWork → array; missing work gets a seeded log-normal
    array of the right shape) and every request is recorded in ``asked``; no model loads."""

    def __init__(
        self,
        n: int,
        config: SelectConfig,
        outputs: dict[Any, np.ndarray] | None = None,
        n_steps: int = 12,
    ) -> None:
        self.n, self.config, self.n_steps = n, config, n_steps
        self.outputs = dict(outputs or {})
        self.asked: list[Any] = []
        self.rows_asked: list[np.ndarray] = []
        self.stages: list[str] = []
        self.open_stage: str | None = None
        self._rng = np.random.default_rng(123)

    def get(self, work: Any, rows: np.ndarray | None = None) -> np.ndarray:
        assert self.open_stage is not None, f"{work} asked for outside a stage"
        self.asked.append(work)
        if work not in self.outputs:
            shape: tuple[int, ...] = (self.n,)
            if work.output == "embedding":
                shape = (self.n, 8)
            elif work.checkpoints > 1:
                shape = (self.n, work.checkpoints)
            values = self._rng.lognormal(size=shape)
            if work.output == "embedding":
                values /= np.linalg.norm(values, axis=1, keepdims=True)
            self.outputs[work] = values
        values = self.outputs[work]
        if work.some_rows:
            assert rows is not None, f"{work} needs rows"
            self.rows_asked.append(np.asarray(rows))
            return values[np.asarray(rows, dtype=np.int64)].copy()
        assert rows is None
        return values.copy()

    def fine_tune_steps(self, model: str) -> int:
        return self.n_steps

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.stages.append(name)
        outer, self.open_stage = self.open_stage, name
        try:
            yield
        finally:
            self.open_stage = outer


def micro_bench_settings(
    tmp_path: Path, dirs: dict[str, Path], eval_rows: int = 4, **overrides: object
) -> dict[str, Any]:
    """A micro bench config dict: 12 ``make_rows`` training rows, ``eval_rows`` evaluation
    rows, the tiny models, few tokens; top-level ``overrides`` win."""
    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in make_rows(12)), encoding="utf-8")
    dev.write_text(
        "".join(json.dumps(r) + "\n" for r in make_rows(eval_rows, seed=7)), encoding="utf-8"
    )
    settings: dict[str, Any] = {
        "out": str(tmp_path / "a" / "bench"),
        "data": {
            "train": str(train),
            "eval": str(dev),
            "template": "Summarize: {dialogue}\nSummary:",
            "output_field": "summary",
            "references": ["summary"],
            "max_length": 64,
        },
        "models": {"small": str(dirs["small"]), "target": str(dirs["target"])},
        "methods": ["random"],
        "prune_rates": [0.5],
        "seeds": [0],
        "finetune": {"epochs": 1, "batch_size": 4},
        "select": {"regions": 3, "verify_per_region": 2, "small_epochs": 1, "batch_size": 4},
        "generation": {"max_new_tokens": 5, "batch_size": 3},
        "metrics": {"bootstrap": 50, "bleu_bootstrap": 10},
    }
    settings.update(overrides)
    return settings


MIXED_LENGTHS = [24, 6, 20, 10, 3]
MIXED_PROMPTS = [18, 3, 15, 4, 2]  # long and short prompts in one batch


def mixed_prompt_data(vocab: int, seed: int = 0) -> TokenizedData:
    """Random ids below ``vocab`` with long and short prompts in one batch: the response window
    of a batch is set by its earliest response token."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(1, vocab, n).tolist() for n in MIXED_LENGTHS]
    labels = [[-100] * p + x[p:] for p, x in zip(MIXED_PROMPTS, ids, strict=True)]
    return TokenizedData(input_ids=ids, labels=labels, pad_token_id=0)


def lm_head_lengths(model: Any) -> list[int]:
    """How many positions each later call of the model's lm_head sees (a forward hook)."""
    seen: list[int] = []
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[1]))
    return seen


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "small": tiny_model_folder(root / "small", "llama", seed=1),
        # Same tokenizer as "small" (one family), other weights and architecture size.
        "target": tiny_model_folder(root / "target", "llama", hidden_size=48, seed=2),
        # Another tokenizer: another family.
        "other": tiny_model_folder(root / "other", "gemma3", vocab_size=300, seed=3),
    }


@pytest.fixture
def jsonl_data(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(24)), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own speccore cache, except the real-model conversions (see below)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SPECCORE_CACHE", str(cache))
    return cache
