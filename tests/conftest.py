"""Shared fixtures: tiny model folders (random weights, offline tokenizers) and small data."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

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


# --- float tolerances ---------------------------------------------------------------------------
#
# Two computations of one value that round differently (another batching or padding, another
# kernel, device or engine, a reference loop against a batched version) agree only up to their
# rounding errors, and those scale with the dtype: a sum of n terms in floating point has a
# relative error of at most gamma_n = n*u/(1 - n*u), u = eps/2 (Higham, "Accuracy and Stability
# of Numerical Algorithms", 2nd ed., eq. 3.4 and section 4.2). Two such sums of the same terms,
# rounded in different orders, differ by at most about 2*gamma_n ~ n*eps. A value computed
# through a chain of reductions (a forward pass: matmuls over the hidden size, softmax over the
# positions, logsumexp over the vocabulary) carries, to first order, the sum of their errors, so
# n is the summed length of the reductions along its path. That is a worst-case bound (the
# typical error is nearer sqrt(n)*eps), and it assumes the value is not the small difference of
# large ones; it holds on any BLAS, thread count or device, where a fixed 1e-7 does not: float32's
# eps is 1.19e-7, so rtol=1e-7 asked two batchings to agree to better than one unit in the last
# place. Comparisons that the code promises to be bit-identical (same batching, resume,
# determinism) stay exact.


def eps(dtype: Any) -> float:
    """Machine epsilon of a torch or numpy float dtype (or its name)."""
    if isinstance(dtype, torch.dtype):
        return float(torch.finfo(dtype).eps)
    return float(np.finfo(np.dtype(dtype)).eps)


def tol(dtype: Any, terms: int = 1) -> float:
    """Relative tolerance for one value computed two ways in ``dtype``, through reductions of
    ``terms`` floating-point terms in all (see above): ``terms * eps(dtype)``."""
    if terms < 1:
        raise ValueError(f"terms must be >= 1, got {terms}")
    return terms * eps(dtype)


def forward_terms(model: Any, tokens: int, *, backward: bool = False) -> int:
    """The summed length of the reductions in one pass of a decoder (Llama or Gemma 3 style)
    over ``tokens`` positions, for :func:`tol`.

    Per layer: the RMSNorms (hidden; Gemma 3 has four, and q/k norms over head_dim), the q, k, v,
    gate and up projections (hidden each), the attention scores (head_dim), the softmax and the
    weighted sum over the positions (tokens each), the output projection (heads * head_dim) and
    the MLP's down projection (intermediate). Then the final norm and the lm_head (hidden each),
    the logsumexp over the vocabulary and the mean over the tokens. ``backward`` adds the same
    again (each product's transpose) and the sum over the tokens of a weight's gradient.
    ``model`` is a model or its config.
    """
    config = getattr(model, "config", model)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    per_layer = (
        4 * hidden  # norms (Gemma 3: input, post-attention, pre- and post-MLP)
        + 2 * head_dim  # Gemma 3's q and k norms
        + 5 * hidden  # q, k, v, gate, up
        + head_dim  # q . k
        + 2 * tokens  # softmax and the weighted sum of the values
        + heads * head_dim  # o_proj
        + config.intermediate_size  # down_proj
    )
    n = config.num_hidden_layers * per_layer + 2 * hidden + config.vocab_size + tokens
    return 2 * n + tokens if backward else n


def model_tol(model: Any, tokens: int, dtype: Any = None, *, backward: bool = False) -> float:
    """Relative tolerance for a value ``model`` computes two ways (rows of up to ``tokens``
    tokens) in ``dtype`` (default: the model's parameters' dtype).

    float32 and float64: :func:`tol` over :func:`forward_terms`. bfloat16 and float16: torch
    sums their matmuls and reductions in float32 and rounds each result to the half dtype; the
    residual stream is rounded after the embedding, after every layer and at the logits, so
    each computation carries up to ``(layers + 2) * u`` (u = eps/2, first order) and two of them
    differ by up to ``(layers + 2) * eps`` (twice that with a backward pass), on top of the
    float32 sums.
    """
    if dtype is None:
        dtype = next(model.parameters()).dtype
    terms = forward_terms(model, tokens, backward=backward)
    if eps(dtype) <= eps(torch.float32):
        return tol(dtype, terms)
    config = getattr(model, "config", model)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    roundings = (config.num_hidden_layers + 2) * (2 if backward else 1)
    return tol(dtype, roundings) + tol(torch.float32, terms)


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
