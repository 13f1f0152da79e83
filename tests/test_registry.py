"""Methods are found through the ``speccore.methods`` entry points, speccore's own included: every
module that registers a method is listed, and one that fails to load is a clear error."""

from __future__ import annotations

import ast
import importlib.metadata
from pathlib import Path
from typing import Any

import pytest
import tomllib

from speccore.selection import base
from speccore.utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def modules_that_register_methods() -> set[str]:
    """``speccore.selection.<module>`` for every module holding a ``@register_method`` class."""
    found = set()
    for path in (ROOT / "src" / "speccore" / "selection").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(d, ast.Name) and d.id == "register_method" for d in node.decorator_list
            ):
                found.add(f"speccore.selection.{path.stem}")
    return found


def test_every_method_module_is_an_entry_point_of_speccore() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    declared = set(project["project"]["entry-points"][base.ENTRY_POINT_GROUP].values())
    modules = modules_that_register_methods()
    assert len(modules) >= 8, "the scan found too few modules: it is broken"
    assert modules == declared, f"missing: {modules - declared}, stale: {declared - modules}"
    installed = {p.value for p in importlib.metadata.entry_points(group=base.ENTRY_POINT_GROUP)}
    assert declared <= installed, "reinstall speccore (pip install -e .): entry points are stale"


def test_the_built_in_methods_are_loaded_from_entry_points() -> None:
    assert {"staff", "random", "grand", "el2n", "ccs", "d2", "s2l", "perplexity"} <= set(
        base.method_names()
    )


class _Point:
    def __init__(self, name: str, value: str) -> None:
        self.name, self.value = name, value

    def load(self) -> Any:
        return importlib.import_module(self.value)


def test_a_method_that_fails_to_load_is_an_error_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    points = [_Point("staff", "speccore.selection.staff"), _Point("broken", "no_such_pkg.mod")]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: points)
    monkeypatch.setattr(base, "_loaded", False)
    with pytest.raises(ConfigError, match=r"'broken'.*no_such_pkg\.mod.*ModuleNotFoundError"):
        base.load_methods()


def test_without_the_built_in_entry_points_the_error_says_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    monkeypatch.setattr(base, "_loaded", False)
    with pytest.raises(ConfigError, match="not installed"):
        base.load_methods()
