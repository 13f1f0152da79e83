"""--engine ray: the same scores as local scoring, resume by shard, and a clear error without Ray.

One local Ray (2 CPUs, so a pool of one actor) serves the tests that need it (marked slow).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
import torch

from conftest import make_rows, model_tol
from speccore import SelectConfig
from speccore.run.slot import ENGINES, ModelSlot
from speccore.scoring import ray_engine, score_samples
from speccore.selection.base import StageTimer
from speccore.utils.cache import ScoreCache
from speccore.utils.errors import ConfigError

N = 24


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def slot(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> ModelSlot:
    """The tiny small model with a random (non-zero) adapter, on 24 rows."""
    cfg = SelectConfig(
        data="unused",
        input_field="dialogue",
        output_field="summary",
        max_length=64,
        max_batch_tokens=96,  # several batches, so shards hold more than one
        engine="ray",
        device="cpu",
    )
    dataset = datasets.Dataset.from_list(make_rows(N))
    cache = ScoreCache(tmp_path_factory.mktemp("ray-cache"))
    s = ModelSlot("small", str(model_dirs["small"]), cfg, dataset, StageTimer(), cache)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in s.peft.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return s


def request(slot: ModelSlot, score: str, indices: np.ndarray | None = None) -> Any:
    """The provider's plain scoring request for ``score`` under the slot's adapter."""
    return slot.request(score, slot.scorer.key(score), indices, None)


def local(slot: ModelSlot, score: str, indices: np.ndarray | None = None) -> np.ndarray:
    return score_samples(
        slot.peft, slot.data, score, indices=indices, max_batch_tokens=slot.batch_tokens
    )


def assert_close(got: np.ndarray, want: np.ndarray, slot: ModelSlot) -> None:
    """Ray's shards batch the rows (up to 64 tokens) otherwise than the local run: other float32
    sums in a forward and (effort) a backward pass."""
    assert got.shape == want.shape
    assert np.all(want > 0)
    rtol = model_tol(slot.peft, 64, backward=True)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=0)


@pytest.mark.slow
def test_all_samples_match_local_scoring_and_resume_only_missing_shards(
    ray_cluster: Any, slot: ModelSlot, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = local(slot, "effort")
    got = ray_engine.score_with_ray(request(slot, "effort"), shard_samples=6)
    assert_close(got, want, slot)

    idx = np.arange(N)
    shards = ray_engine.plan_shards(slot.data, idx, slot.batch_tokens, 6)
    folder = ray_engine.shard_folder(request(slot, "effort"), idx, slot.batch_tokens, shards)
    files = sorted(folder.glob("shard-*.npz"))
    assert len(shards) >= 3 and len(files) == len(shards)

    scored: list[list[int]] = []
    real = ray_engine.run_shards

    def spy(ray: Any, data: Any, idx: Any, shards: Any, todo: list[int], *rest: Any) -> None:
        scored.append(list(todo))
        real(ray, data, idx, shards, todo, *rest)

    monkeypatch.setattr(ray_engine, "run_shards", spy)
    files[1].unlink()
    again = ray_engine.score_with_ray(request(slot, "effort"), shard_samples=6)
    assert scored == [[1]]
    assert files[1].exists()
    assert_close(again, want, slot)
    # Nothing missing: no Ray work at all.
    ray_engine.score_with_ray(request(slot, "effort"), shard_samples=6)
    assert scored == [[1]]


@pytest.mark.slow
def test_subset_of_indices_matches_local_scoring(ray_cluster: Any, slot: ModelSlot) -> None:
    indices = np.array([17, 3, 9, 3, 22], dtype=np.int64)
    # Through the provider's engine table: engine == "ray" dispatches to Ray.
    got = ENGINES[slot.cfg.engine](request(slot, "loss", indices))
    assert_close(got, local(slot, "loss", indices), slot)
    assert got[1] == got[3]  # a repeated index gets the same score


def test_engine_ray_without_ray_is_a_config_error(
    slot: ModelSlot, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    with pytest.raises(ConfigError, match=r"--engine ray needs Ray: pip install 'speccore\[ray\]'"):
        ENGINES[slot.cfg.engine](request(slot, "effort"))
