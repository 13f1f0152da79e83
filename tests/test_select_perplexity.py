"""Perplexity bands: hand-worked bands (ties, m = N, m = 1, odd leftovers), the method on a fake
provider (which model, the scores it reports, its plan), and end to end on the tiny models:
the untuned loss is shared with S2L's first checkpoint and the tuned one with STAFF's fine-tune."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import speccore
from conftest import tiny_select_config, tol
from speccore.config import SelectConfig
from speccore.selection.base import get_method
from speccore.selection.perplexity import band_indices, band_start
from speccore.utils.errors import ConfigError, ScoringError

# index:            0    1    2    3    4    5    6
VALUES = np.array([0.5, 0.2, 0.9, 0.2, 0.7, 0.5, 0.1])
# Ascending, ties in index order: 6 (0.1), 1, 3 (0.2), 0, 5 (0.5), 4 (0.7), 2 (0.9).


def test_bands_hand_worked():
    assert band_indices(VALUES, 3, "low").tolist() == [1, 3, 6]
    assert band_indices(VALUES, 3, "high").tolist() == [2, 4, 5]
    # N − m = 4 left out: 2 below, 2 above; positions 2..4 are 3, 0, 5.
    assert band_indices(VALUES, 3, "middle").tolist() == [0, 3, 5]


def test_ties_are_broken_by_index():
    # 0.2 at 1 and 3: the low band of 2 takes 6 and 1 (the lower index comes first).
    assert band_indices(VALUES, 2, "low").tolist() == [1, 6]
    # 0.5 at 0 and 5: the high band of 4 starts at position 3, index 0, and takes 5 after it.
    assert band_indices(VALUES, 4, "high").tolist() == [0, 2, 4, 5]
    assert band_indices(VALUES, 3, "high").tolist() == [2, 4, 5]
    # All equal: the order is the index order.
    flat = np.full(6, 3.0)
    assert band_indices(flat, 2, "low").tolist() == [0, 1]
    assert band_indices(flat, 2, "middle").tolist() == [2, 3]
    assert band_indices(flat, 2, "high").tolist() == [4, 5]


def test_middle_band_with_odd_leftovers_leaves_the_extra_one_out_at_the_top():
    # N − m = 5: 2 below, 3 above; positions 2, 3 are indices 3 and 0.
    assert band_start(7, 2, "middle") == 2
    assert band_indices(VALUES, 2, "middle").tolist() == [0, 3]
    assert band_start(7, 4, "middle") == 1  # N − m = 3: 1 below, 2 above
    assert band_indices(VALUES, 4, "middle").tolist() == [0, 1, 3, 5]


def test_m_equals_n_and_m_equals_one():
    for band in ("low", "middle", "high"):
        assert band_indices(VALUES, 7, band).tolist() == list(range(7))  # type: ignore[arg-type]
        assert band_indices(VALUES, 0, band).tolist() == []  # type: ignore[arg-type]
    assert band_indices(VALUES, 1, "low").tolist() == [6]
    assert band_indices(VALUES, 1, "high").tolist() == [2]
    assert band_indices(VALUES, 1, "middle").tolist() == [0]  # position 3 of 7


def test_bands_agree_with_a_slow_reference():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 5, 40).astype(float)  # many ties
    ranked = sorted(range(40), key=lambda i: (values[i], i))
    for m in (1, 7, 20, 39, 40):
        left_out = 40 - m
        expect = {
            "low": ranked[:m],
            "middle": ranked[left_out // 2 : left_out // 2 + m],
            "high": ranked[left_out:],
        }
        for band, kept in expect.items():
            assert band_indices(values, m, band).tolist() == sorted(kept)  # type: ignore[arg-type]


def test_bad_input():
    with pytest.raises(ScoringError, match="sample 1"):
        band_indices(np.array([1.0, np.inf]), 1, "low")
    with pytest.raises(ValueError, match="budget"):
        band_indices(VALUES, 8, "middle")


# --- the method on a fake provider ---------------------------------------------------------------


class FakeProvider:
    """Small-model losses in, calls recorded; anything else is an error."""

    def __init__(self, loss: np.ndarray, config: SelectConfig) -> None:
        self.n = len(loss)
        self.config = config
        self.loss = loss
        self.asked: list[tuple[str, bool]] = []

    def get(self, work, rows=None) -> np.ndarray:  # type: ignore[no-untyped-def]
        assert work.model == "small" and rows is None
        self.asked.append((work.output, work.tuned))
        return self.loss.copy()

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        raise AssertionError(f"perplexity asked the provider for {name}")

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        yield


def _cfg(**kw: object) -> SelectConfig:
    return SelectConfig.from_dict({"data": "fake.jsonl", "method": "perplexity", **kw})


def test_defaults_and_choices():
    settings = _cfg().method_settings
    assert (settings.perplexity_model, settings.band) == ("untuned", "middle")
    assert get_method("perplexity").needs == ("small",)
    with pytest.raises(ConfigError, match="--band"):
        _cfg(band="centre")
    with pytest.raises(ConfigError, match="--perplexity-model"):
        _cfg(perplexity_model="large")


@pytest.mark.parametrize("model", ["untuned", "tuned"])
def test_method_keeps_the_band_and_reports_perplexities(model: str):
    loss = np.log(VALUES * 10)  # perplexities 5, 2, 9, 2, 7, 5, 1
    provider = FakeProvider(loss, _cfg(perplexity_model=model, band="high"))
    sel = get_method("perplexity").select(provider, 3, seed=0)
    assert provider.asked == [("loss", model == "tuned")]
    assert sel.indices.tolist() == [2, 4, 5]
    np.testing.assert_allclose(sel.scores, VALUES * 10)
    assert sel.info["perplexity_model"] == model and sel.info["band"] == "high"
    assert (sel.info["n_left_out_low"], sel.info["n_left_out_high"]) == (4, 0)
    assert sel.info["band_min"] == pytest.approx(5.0) and sel.info["band_max"] == pytest.approx(9.0)


def test_no_randomness_the_seed_changes_nothing():
    loss = np.random.default_rng(1).random(50)
    picks = {
        tuple(get_method("perplexity").select(FakeProvider(loss, _cfg()), 10, seed=s).indices)
        for s in range(4)
    }
    assert len(picks) == 1


def test_plan():
    def plan(**kw: object) -> list[tuple[str, str, str]]:
        work = get_method("perplexity").plan(_cfg(**kw), 30)
        return [(w.stage, w.role, w.kind) for w in work]

    scoring = ("small scoring", "small", "loss")
    assert plan() == [scoring]
    assert plan(perplexity_model="tuned") == [("small fine-tune", "small", "train"), scoring]
    assert plan(perplexity_model="tuned", small_adapter="a") == [scoring]


# --- end to end on the tiny models ---------------------------------------------------------------


def test_perplexity_shares_the_small_models_work_with_staff_and_s2l(
    jsonl_data: Path, model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
):
    from conftest import ModelWorkSpy

    def cfg(**kw: object) -> SelectConfig:
        return tiny_select_config(jsonl_data, model_dirs, device="cpu", **kw)

    spy = ModelWorkSpy(monkeypatch)
    s2l = speccore.select(cfg(method="s2l", s2l_clusters=3))
    assert spy.finetunes == [24]
    spy.scored.clear()
    untuned = speccore.select(cfg(method="perplexity"))
    tuned = speccore.select(cfg(method="perplexity", perplexity_model="tuned", band="low"))
    # Both losses are S2L's first and last checkpoint: no fine-tune, no scoring.
    assert spy.finetunes == [24] and spy.scored == []
    traj = np.array(s2l.info["trajectories"])
    # The same float64 losses through exp and back through log: a rounding each, and log's
    # absolute error eps is relative eps / loss (losses here are near ln(400) ~ 6, above 1).
    rtol = tol(np.float64, 4)
    np.testing.assert_allclose(np.log(untuned.scores), traj[:, 0], rtol=rtol)
    np.testing.assert_allclose(np.log(tuned.scores), traj[:, -1], rtol=rtol)
    assert len(untuned) == len(tuned) == 12
    # The low band holds the 12 lowest tuned perplexities.
    kept = np.zeros(24, dtype=bool)
    kept[tuned.indices] = True
    assert tuned.scores[kept].max() <= tuned.scores[~kept].min()
    # The middle band leaves 6 out on either side.
    order = np.argsort(untuned.scores, kind="stable")
    assert untuned.indices.tolist() == sorted(order[6:18].tolist())


def test_untuned_model_is_refused_with_a_user_adapter(
    jsonl_data: Path, model_dirs: dict[str, Path], tmp_path: Path
):
    out = tmp_path / "run"
    speccore.select(
        tiny_select_config(
            jsonl_data, model_dirs, method="perplexity", perplexity_model="tuned", out=str(out)
        )
    )
    adapter = out / "small_adapter"
    with pytest.raises(ConfigError, match="--small-adapter"):
        speccore.select(
            tiny_select_config(
                jsonl_data, model_dirs, method="perplexity", small_adapter=str(adapter)
            )
        )
    sel = speccore.select(
        tiny_select_config(
            jsonl_data,
            model_dirs,
            method="perplexity",
            perplexity_model="tuned",
            small_adapter=str(adapter),
        )
    )
    assert len(sel) == 12
