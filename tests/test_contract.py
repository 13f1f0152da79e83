"""One contract for every registered method, on a recording provider (arrays in, no model):
exactly m unique indices in [0, N); the same seed gives the same coreset, another seed another
one where the method draws at random; its settings are a registered dataclass; the model work
it asks for is exactly the work it declares, so its plan (derived from that) is what it does."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from conftest import ArrayProvider
from speccore.config import SelectConfig, coreset_size, select_flags
from speccore.selection.base import (
    MethodSettings,
    ModelWork,
    SelectionMethod,
    Work,
    get_method,
    method_class,
    method_names,
    register_method,
)
from speccore.utils.errors import ConfigError

N = 60


def run(name: str, seed: int, prune_rate: float = 0.7, **settings: Any) -> ArrayProvider:
    cfg = SelectConfig.from_dict(
        {"data": "fake", "method": name, "prune_rate": prune_rate, "regions": 5, **settings}
    )
    provider = ArrayProvider(N, cfg)
    provider.selection = get_method(name).select(provider, coreset_size(N, prune_rate), seed)
    return provider


def indices(name: str, seed: int, prune_rate: float = 0.7) -> np.ndarray:
    return run(name, seed, prune_rate).selection.indices


@pytest.mark.parametrize("name", method_names())
def test_exactly_m_unique_indices_in_range(name: str) -> None:
    for p in (0.2, 0.7, 0.95):
        idx = indices(name, seed=0, prune_rate=p)
        m = coreset_size(N, p)
        assert len(idx) == m, f"{name} kept {len(idx)} at p = {p}, m = {m}"
        assert len(np.unique(idx)) == m
        assert idx.min() >= 0 and idx.max() < N


@pytest.mark.parametrize("name", method_names())
def test_same_seed_same_coreset_other_seed_other_one(name: str) -> None:
    a, b = indices(name, seed=0), indices(name, seed=0)
    assert np.array_equal(a, b)
    other = [indices(name, seed=s) for s in (1, 2, 3)]
    differs = any(not np.array_equal(a, o) for o in other)
    assert differs == method_class(name).random_draws, (
        f"{name}: random_draws={method_class(name).random_draws} but seeds "
        f"{'changed' if differs else 'did not change'} the coreset"
    )


@pytest.mark.parametrize("name", method_names())
def test_settings_description_and_plan(name: str) -> None:
    cls = method_class(name)
    assert cls.description and len(cls.description.splitlines()) == 1
    assert issubclass(cls.settings_class, MethodSettings)
    flags = {f.name for f in select_flags()}
    assert {f.name for f in dataclasses.fields(cls.settings_class)} <= flags
    cfg = SelectConfig.from_dict({"data": "fake", "method": name})
    plan = get_method(name).plan(cfg, N)
    assert all(isinstance(w, Work) for w in plan)
    roles = {w.role for w in plan}
    assert roles <= set(cls.needs), f"{name} plans work on {roles} but needs {cls.needs}"


# Settings under which a method's requests change; each method runs under its own and none.
VARIANTS: list[dict[str, Any]] = [
    {},
    {"verification": False},
    {"score": "loss"},
    {"perplexity_model": "tuned"},
    {"s2l_checkpoints": 4},
]


def _variants() -> list[Any]:
    """(method, settings) for every method under each variant whose settings it has."""
    out = []
    for name in method_names():
        fields = {f.name for f in dataclasses.fields(method_class(name).settings_class)}
        for s in VARIANTS:
            if set(s) <= fields:
                out.append(pytest.param(name, s, id=f"{name}-{','.join(s) or 'defaults'}"))
    return out


@pytest.mark.parametrize(("name", "settings"), _variants())
def test_requests_are_exactly_what_select_asks_for(name: str, settings: dict[str, Any]) -> None:
    provider = run(name, seed=0, **settings)
    declared = get_method(name).requests(provider.config, N)
    assert set(provider.asked) == set(declared), (
        f"{name} asked for {set(provider.asked)} but declares {set(declared)}"
    )
    assert len(set(declared)) == len(declared), f"{name} declares a request twice"
    # The plan is derived from the requests: a stage for each, a fine-tune per tuned model.
    plan = get_method(name).plan(provider.config, N)
    assert [w.stage for w in plan if w.kind != "train"] == [w.stage for w in declared]
    tuned = {w.model for w in declared if w.tuned}
    assert {w.role for w in plan if w.kind == "train"} == tuned


def test_a_recording_provider_catches_an_undeclared_request() -> None:
    """The check above can fail: a method asking for more than it declares."""

    class Sneaky(SelectionMethod):
        name = "sneaky-test"
        description = "asks for work it does not declare"

        def requests(self, config: Any, n: int) -> list[ModelWork]:
            return [ModelWork("small", "loss")]

        def select(self, provider: Any, budget: int, seed: int) -> Any:
            with provider.stage("small setup"):
                provider.get(ModelWork("small", "loss"))
                provider.get(ModelWork("small", "effort", tuned=True))
            return None

    cfg = SelectConfig.from_dict({"data": "fake", "method": "random"})
    provider = ArrayProvider(N, cfg)
    Sneaky().select(provider, 3, 0)
    assert set(provider.asked) != set(Sneaky().requests(cfg, N))


def test_registration_checks_what_a_method_must_declare() -> None:
    class NoName(SelectionMethod):
        description = "x"

        def select(self, provider: Any, budget: int, seed: int) -> Any: ...

        def requests(self, config: Any, n: int) -> list[ModelWork]:
            return []

    with pytest.raises(TypeError, match="no name"):
        register_method(NoName)

    class Clash(NoName):
        name = "clash-test"

    @dataclasses.dataclass
    class ClashSettings(MethodSettings):
        regions: int = 7  # STAFF declares regions with default 50

    Clash.settings_class = ClashSettings
    with pytest.raises(TypeError, match="regions"):
        register_method(Clash)
    assert "clash-test" not in method_names()
    with pytest.raises(TypeError, match="not a SelectionMethod"):
        register_method(int)  # type: ignore[arg-type]


def test_unknown_method_suggests_and_lists() -> None:
    with pytest.raises(ConfigError, match=r"did you mean staff\?.*random"):
        get_method("stafff")
