"""S2L (SmallToLarge): checkpoints on the snapshot grid, k-means over trajectories, balanced
sampling over clusters (hand-worked), seeds, the method on a fake provider, the fine-tune's
snapshot hook, and end to end on the tiny models: STAFF then S2L fine-tune the small model once."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig

import speccore
from conftest import ModelWorkSpy, forward_terms, tiny_select_config, tol
from speccore.config import LoraSettings, SelectConfig, TrainSettings
from speccore.run.pipeline import select_with_tokens
from speccore.selection.base import get_method, method_names, rng_for
from speccore.selection.checkpoints import (
    SNAPSHOT_GRID,
    checkpoint_grid,
    checkpoint_steps,
    snapshot_steps,
)
from speccore.selection.s2l import balanced_sample, cluster_trajectories, s2l_select, trajectories
from speccore.utils.errors import ConfigError, ScoringError

# --- checkpoints ------------------------------------------------------------------------------


def test_checkpoints_are_evenly_spaced_on_the_grid_both_ends_included():
    assert SNAPSHOT_GRID == 12
    assert checkpoint_grid(2) == [0, 12]
    assert checkpoint_grid(4) == [0, 4, 8, 12]
    assert checkpoint_grid(7) == [0, 2, 4, 6, 8, 10, 12]
    assert checkpoint_grid(13) == list(range(13))
    # 12/5 = 2.4 apart: 0, 2.4, 4.8, 7.2, 9.6, 12 rounded to the nearest grid point.
    assert checkpoint_grid(6) == [0, 2, 5, 7, 10, 12]
    for bad in (0, 1, 14):
        with pytest.raises(ConfigError, match="checkpoints must be in"):
            checkpoint_grid(bad)
        with pytest.raises(ConfigError, match="--s2l-checkpoints must be in"):
            SelectConfig.from_dict(
                {"data": "x", "method": "s2l", "s2l_checkpoints": bad}
            ).validate()


def test_checkpoint_steps_and_snapshot_steps():
    # 114 steps (300 rows, batch 8, 3 epochs): grid point j is step round(j·114/12) = 9.5·j.
    assert checkpoint_steps(114, 7) == [0, 19, 38, 57, 76, 95, 114]
    assert snapshot_steps(114) == [10, 19, 29, 38, 48, 57, 67, 76, 86, 95, 105]
    # Every inner checkpoint is a snapshot step, whatever C.
    for c in range(2, 14):
        assert set(checkpoint_steps(114, c)) - {0, 114} <= set(snapshot_steps(114))
    # Fewer steps than grid points: points share steps; the ends need no snapshot.
    assert checkpoint_steps(6, 7) == [0, 1, 2, 3, 4, 5, 6]
    assert snapshot_steps(6) == [1, 2, 3, 4, 5]
    assert snapshot_steps(3) == [1, 2]
    assert snapshot_steps(1) == []
    assert checkpoint_steps(3, 5) == [0, 1, 2, 2, 3]  # j = 3, 6, 9 → 0.75, 1.5, 2.25 → 1, 2, 2


# --- balanced sampling (Algorithm 1, steps 3-5) -------------------------------------------------


def _labels(sizes: list[int]) -> np.ndarray:
    return np.concatenate([np.full(s, c) for c, s in enumerate(sizes)]).astype(np.int64)


def test_balanced_sampling_hand_worked_with_clusters_smaller_than_their_share():
    # Sizes 1, 2, 10, 7; m = 12. Visit by size: 1 (share ⌊12/4⌋ = 3: all 1), 2 (⌊11/3⌋ = 3: all
    # 2), 7 (⌊9/2⌋ = 4), 10 (the 5 left).
    labels = _labels([1, 2, 10, 7])
    indices, budgets = balanced_sample(labels, 12, rng_for(0, "s2l"))
    assert budgets == {0: 1, 1: 2, 2: 5, 3: 4}
    assert len(indices) == 12 and len(set(indices.tolist())) == 12
    taken = Counter(labels[indices].tolist())
    assert taken == {0: 1, 1: 2, 2: 5, 3: 4}
    assert {0, 1, 2} <= set(indices.tolist())  # the two small clusters are taken whole


def test_balanced_sampling_small_budget_and_equal_sizes():
    # m = 2 < K = 4: shares ⌊2/4⌋ = ⌊2/3⌋ = 0, then one each for the two largest clusters.
    _, budgets = balanced_sample(_labels([1, 2, 3, 4]), 2, rng_for(0, "s2l"))
    assert budgets == {0: 0, 1: 0, 2: 1, 3: 1}
    # Equal sizes: lower label first; it gets ⌊3/2⌋ = 1, the other the 2 left.
    _, budgets = balanced_sample(_labels([5, 5]), 3, rng_for(0, "s2l"))
    assert budgets == {0: 1, 1: 2}
    # Labels need not be contiguous or in order.
    labels = np.array([7, 3, 7, 7, 3, 9])
    indices, budgets = balanced_sample(labels, 6, rng_for(0, "s2l"))
    assert budgets == {3: 2, 7: 3, 9: 1} and indices.tolist() == list(range(6))


def test_balanced_sampling_edges():
    labels = _labels([3, 4])
    assert balanced_sample(labels, 0, rng_for(0, "s2l"))[0].tolist() == []
    with pytest.raises(ValueError, match="budget"):
        balanced_sample(labels, 8, rng_for(0, "s2l"))


# --- k-means and the whole algorithm -------------------------------------------------------------


def _separated(sizes: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Trajectories of len(sizes) well separated shapes (plus small noise), and the groups."""
    rng = np.random.default_rng(seed)
    shapes = np.array([[5.0, 4.0, 3.0], [5.0, 1.0, 0.5], [2.0, 2.0, 2.0], [8.0, 8.0, 1.0]])
    groups = _labels(sizes)
    return shapes[groups] + rng.normal(0, 0.01, (len(groups), 3)), groups


def test_kmeans_finds_separated_trajectory_shapes():
    losses, groups = _separated([2, 5, 20])
    labels = cluster_trajectories(losses, 3, seed=0)
    # The same partition, whatever the label names.
    pairs = set(zip(groups.tolist(), labels.tolist(), strict=True))
    assert len(pairs) == 3 and len({g for g, _ in pairs}) == len({c for _, c in pairs}) == 3


def test_s2l_select_hand_worked_on_separated_clusters():
    # Sizes 2, 5, 20; m = 9: all of the 2 (share 3), 3 of the 5 (⌊7/2⌋), the 4 left of the 20.
    losses, groups = _separated([2, 5, 20])
    indices, info = s2l_select(losses, 9, clusters=3, seed=0)
    assert Counter(groups[indices].tolist()) == {0: 2, 1: 3, 2: 4}
    assert info["n_clusters"] == 3 and len(info["clusters"]) == 27
    rows = sorted(info["region_table"], key=lambda r: r["size"])
    assert [(r["size"], r["budget"], r["taken"]) for r in rows] == [
        (2, 2, 2),
        (5, 3, 3),
        (20, 4, 4),
    ]
    small = next(r for r in rows if r["size"] == 2)
    assert small["loss_first"] == pytest.approx(5.0, abs=0.05)
    assert small["loss_last"] == pytest.approx(3.0, abs=0.05)


def test_clusters_are_capped_by_distinct_trajectories():
    losses = np.array([[1.0, 0.5]] * 4 + [[2.0, 1.0]] * 3)
    labels = cluster_trajectories(losses, 100, seed=0)
    assert len(set(labels.tolist())) == 2
    assert cluster_trajectories(np.ones((5, 3)), 10, seed=0).tolist() == [0] * 5
    indices, info = s2l_select(losses, 3, clusters=100, seed=0)
    assert info["n_clusters"] == 2 and len(indices) == 3


def test_same_seed_same_coreset_other_seed_other():
    losses = np.random.default_rng(3).random((200, 5))
    a, _ = s2l_select(losses, 50, clusters=8, seed=1)
    b, _ = s2l_select(losses, 50, clusters=8, seed=1)
    c, _ = s2l_select(losses, 50, clusters=8, seed=2)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()


def test_bad_trajectories_name_the_sample():
    losses = np.ones((4, 3))
    losses[2, 1] = np.nan
    with pytest.raises(ScoringError, match="sample 2"):
        s2l_select(losses, 2, clusters=2, seed=0)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        s2l_select(np.ones(4), 2, clusters=2, seed=0)


# --- the method on a fake provider ---------------------------------------------------------------


class FakeProvider:
    """Trajectories in; anything else is an error."""

    def __init__(self, losses: np.ndarray, config: SelectConfig) -> None:
        self.n = len(losses)
        self.config = config
        self.losses = losses
        self.asked: list[int] = []
        self.stages: list[str] = []

    def get(self, work, rows=None) -> np.ndarray:  # type: ignore[no-untyped-def]
        assert (work.model, work.output, work.tuned) == ("small", "loss", True)
        self.asked.append(work.checkpoints)
        return self.losses[:, : work.checkpoints]

    def fine_tune_steps(self, model: str) -> int:
        return 12

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        raise AssertionError(f"s2l asked the provider for {name}")

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.stages.append(name)
        yield


def _cfg(**kw: object) -> SelectConfig:
    return SelectConfig.from_dict({"data": "fake.jsonl", "method": "s2l", **kw})


def test_method_is_registered_with_its_settings():
    assert {"s2l", "perplexity"} <= set(method_names())
    settings = _cfg().method_settings
    assert (settings.s2l_checkpoints, settings.s2l_clusters) == (7, 100)
    assert get_method("s2l").needs == ("small",)
    with pytest.raises(ConfigError, match="--s2l-clusters"):
        _cfg(s2l_clusters=0).validate()


def test_method_selects_on_the_trajectories_and_reports_them():
    losses, groups = _separated([2, 5, 20])
    losses = np.repeat(losses, 2, axis=1)[:, :5]  # 5 checkpoints
    provider = FakeProvider(losses, _cfg(s2l_checkpoints=5, s2l_clusters=3))
    sel = get_method("s2l").select(provider, 9, seed=0)
    assert provider.asked == [5]
    assert Counter(groups[sel.indices].tolist()) == {0: 2, 1: 3, 2: 4}
    assert sel.info["checkpoint_steps"] == [0, 3, 6, 9, 12]
    assert sel.info["checkpoint_epochs"] == [0.0, 0.75, 1.5, 2.25, 3.0]
    np.testing.assert_array_equal(np.array(sel.info["trajectories"]), losses)
    assert len(sel.info["clusters"]) == 27 and sel.info["n_clusters"] == 3
    assert sum(r["taken"] for r in sel.region_table) == 9
    json.dumps(sel.to_dict())  # all of it goes into selection.json
    assert provider.stages == ["small setup", "selection"]


def test_method_refuses_what_has_no_trajectory(tmp_path: Path):
    provider = FakeProvider(np.ones((4, 7)), _cfg(small_adapter=str(tmp_path)))
    with pytest.raises(ConfigError, match="--small-adapter"):
        get_method("s2l").select(provider, 2, seed=0)
    provider = FakeProvider(np.ones((4, 7)), _cfg(small_epochs=0))
    with pytest.raises(ConfigError, match="--small-epochs"):
        get_method("s2l").select(provider, 2, seed=0)
    assert provider.asked == []


def test_plan_is_the_small_fine_tune_and_c_loss_passes():
    work = get_method("s2l").plan(_cfg(s2l_checkpoints=4, small_epochs=2), 30)
    model_work = [(w.stage, w.role, w.kind, w.epochs, w.samples) for w in work]
    assert model_work == [
        ("small fine-tune", "small", "train", 2.0, None),
        ("small trajectories", "small", "loss", 0.0, 120),
    ]


# --- the fine-tune's step hook -------------------------------------------------------------------


def test_finetune_calls_on_step_after_every_optimizer_step():
    from speccore.data.batches import TokenizedData
    from speccore.models import attach_lora, tiny_causal_lm
    from speccore.train import finetune, plan_steps

    rng = np.random.default_rng(0)
    ids = [rng.integers(1, 50, 8).tolist() for _ in range(5)]
    data = TokenizedData(ids, [[-100] * 3 + x[3:] for x in ids], 0)
    model = attach_lora(tiny_causal_lm(50, seed=0), LoraSettings(r=2), seed=0)
    settings = TrainSettings(epochs=2, batch_size=2, grad_accum=1)
    seen: list[tuple[int, float]] = []

    def on_step(step: int) -> None:  # the weights after the step: they change every step
        lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
        seen.append((step, float(lora_b.detach().abs().sum())))

    finetune(model, data, settings, on_step=on_step)
    assert (
        [s for s, _ in seen]
        == list(range(1, len(plan_steps(data.lengths, settings)) + 1))
        == [1, 2, 3, 4, 5, 6]
    )
    assert seen[0][1] > 0 and len({w for _, w in seen}) == len(seen)


# --- end to end on the tiny models ---------------------------------------------------------------


def _loss_under(cfg: SelectConfig, adapter: Path | None) -> np.ndarray:
    """The small model's "loss" of every row, computed outside the provider and its cache:
    under a saved adapter, or a fresh LoRA (the pretrained model)."""
    from speccore.data import Formatting, load_rows, tokenize_dataset
    from speccore.models import attach_lora, load_adapter, load_model
    from speccore.scoring import score_samples

    assert cfg.small is not None
    loaded = load_model(cfg.small, dtype=cfg.dtype, device="cpu")
    data = tokenize_dataset(
        load_rows(cfg.data, cfg.split),
        loaded.tokenizer,
        Formatting.from_config(cfg),
        cfg.max_length,
        cfg.truncation_side,
    )
    if adapter is None:
        model = attach_lora(loaded.model, cfg.lora, seed=cfg.tune_seed)
    else:
        model = load_adapter(loaded.model, adapter)
    return score_samples(model, data, "loss")


def test_staff_then_s2l_fine_tune_the_small_model_once(
    jsonl_data: Path,
    model_dirs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    isolated_cache: Path,
):
    spy = ModelWorkSpy(monkeypatch)
    staff_out = tmp_path / "staff"
    # A bench that runs S2L after STAFF tells STAFF's run what S2L will ask of the cache.
    select_with_tokens(
        tiny_select_config(jsonl_data, model_dirs, out=str(staff_out), device="cpu"),
        expect=[trajectories(7)],
    )
    assert spy.finetunes == [24]
    sel = speccore.select(
        tiny_select_config(jsonl_data, model_dirs, method="s2l", s2l_clusters=4, device="cpu")
    )
    assert spy.finetunes == [24]  # S2L used STAFF's fine-tune and its snapshots
    assert len(sel) == 12 and sel.method == "s2l"
    # 24 rows, token batches of 4 rows' mean length, 1 epoch: 6 steps or a few more; C = 7
    # checkpoints spread over them, the inner ones from the fine-tune's snapshots.
    from speccore.selection.checkpoints import checkpoint_steps, snapshot_steps

    n_steps = sel.info["checkpoint_steps"][-1]
    assert 6 <= n_steps <= 9
    assert sel.info["checkpoint_steps"] == checkpoint_steps(n_steps, 7)
    traj = np.array(sel.info["trajectories"])
    assert traj.shape == (24, 7)
    assert len(set(sel.info["clusters"])) == sel.info["n_clusters"] == 4
    assert {"small setup", "small trajectories", "selection"} <= set(sel.timings)
    snapshots = list(isolated_cache.glob("adapters/*.snapshots/step-*.safetensors"))
    assert len(snapshots) == len(snapshot_steps(n_steps)) >= 5

    cfg = tiny_select_config(jsonl_data, model_dirs, device="cpu")
    # Scored again apart from the pipeline, batched otherwise: other float32 sums in the forward
    # pass over rows of up to 64 tokens.
    config = AutoConfig.from_pretrained(model_dirs["small"])
    rtol = tol(torch.float32, forward_terms(config, 64))
    np.testing.assert_allclose(
        traj[:, -1], _loss_under(cfg, staff_out / "small_adapter"), rtol=rtol
    )
    np.testing.assert_allclose(traj[:, 0], _loss_under(cfg, None), rtol=rtol)
    # The snapshots are other adapters: the loss moves along the fine-tune.
    assert not np.allclose(traj[:, 3], traj[:, 0], rtol=0, atol=1e-9)
    assert not np.allclose(traj[:, 3], traj[:, -1], rtol=0, atol=1e-9)

    # Another K and seed: the trajectories come from the cache, no model work at all.
    spy.scored.clear()
    again = speccore.select(
        tiny_select_config(
            jsonl_data, model_dirs, method="s2l", s2l_clusters=3, seed=4, device="cpu"
        )
    )
    assert spy.finetunes == [24] and spy.scored == []
    np.testing.assert_array_equal(np.array(again.info["trajectories"]), traj)


def test_staff_alone_keeps_no_snapshots(
    jsonl_data: Path, model_dirs: dict[str, Path], isolated_cache: Path
):
    speccore.select(tiny_select_config(jsonl_data, model_dirs, device="cpu"))
    assert list(isolated_cache.glob("adapters/*")) and not list(
        isolated_cache.glob("adapters/*.snapshots")
    )


def test_adapter_without_snapshots_is_fine_tuned_again_for_them(
    jsonl_data: Path,
    model_dirs: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    isolated_cache: Path,
):
    cfg = tiny_select_config(jsonl_data, model_dirs, method="s2l", s2l_checkpoints=3, device="cpu")
    first = speccore.select(cfg)
    for folder in isolated_cache.glob("adapters/*.snapshots"):
        shutil.rmtree(folder)
    for stored in isolated_cache.glob("scores/*.npz"):
        stored.unlink()  # trajectories and losses too: they must be computed again
    spy = ModelWorkSpy(monkeypatch)
    second = speccore.select(cfg)
    assert spy.finetunes == [24]  # once more, only to record the snapshots
    steps = second.info["checkpoint_steps"]
    assert steps == first.info["checkpoint_steps"] and len(steps) == 3 and 0 < steps[1] < steps[2]
    # The same settings and seed: the same fine-tune and the same batches, bit for bit.
    np.testing.assert_array_equal(
        np.array(second.info["trajectories"]), np.array(first.info["trajectories"])
    )
    assert second.indices.tolist() == first.indices.tolist()
