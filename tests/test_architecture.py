"""The package's shape: no import cycle between its parts (lazy and type-only imports count),
and every subpackage imports on its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "speccore"
SUBPACKAGES = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())


def part_of(module: str) -> str | None:
    """``speccore.scoring.effort`` → ``scoring``; a top-level module is its own part."""
    parts = module.split(".")
    if parts[0] != "speccore" or len(parts) < 2:
        return None
    return parts[1]


def imports_of(path: Path) -> set[str]:
    """Every speccore module ``path`` imports, at any depth (functions, TYPE_CHECKING)."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    here = list(rel.parts)[:-1]  # the package holding the module (an __init__: its own)
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("speccore"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # from . import x
                    out.update(f"{module}.{a.name}" for a in node.names)
                    continue
            else:
                module = node.module or ""
            if module.startswith("speccore"):
                out.add(module)
    return out


def part_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        src = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if src == "__init__":
            continue  # the package's front door imports its parts to re-export them
        for module in imports_of(path):
            dst = part_of(module)
            if dst and dst != src and dst != "__init__":
                graph.setdefault(src, set()).add(dst)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_of_the_parts_has_no_cycle() -> None:
    graph = part_graph()
    assert graph, "no imports found: the walker is broken"
    assert "scoring" in graph and "data" in graph["scoring"]  # the walker sees real edges
    assert find_cycle(graph) is None, f"import cycle: {' → '.join(find_cycle(graph) or [])}"


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


@pytest.mark.slow  # a fresh interpreter per subpackage: ~6 s each on 2 busy cores
@pytest.mark.parametrize("name", SUBPACKAGES)
def test_every_subpackage_imports_on_its_own(name: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", f"import speccore.{name}"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]


def module_graph() -> dict[str, set[str]]:
    """Every module's speccore imports resolved to modules (``from .x import name`` → ``x``),
    lazy and type-only ones included; a package counts as its ``__init__``."""
    modules: dict[str, Path] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        out = set()
        for target in imports_of(path):
            while target and target not in modules:  # speccore.x.name → speccore.x
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
        graph[name] = out
    return graph


def test_no_import_cycle_between_modules() -> None:
    graph = module_graph()
    assert "speccore.run.provider" in graph["speccore.run.pipeline"]  # the walker sees edges
    # A package's __init__ imports its own modules to re-export them; a module importing a
    # sibling through the package (``from . import x``) is an edge to x, not to the package.
    inner = {
        m: {t for t in deps if not (m.startswith(t + ".") and t != "speccore")}
        for m, deps in graph.items()
    }
    assert find_cycle(inner) is None, f"import cycle: {' → '.join(find_cycle(inner) or [])}"


def test_no_two_modules_share_a_name() -> None:
    names: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path.stem not in {"__init__", "__main__"}:
            names.setdefault(path.stem, []).append(str(path.relative_to(PACKAGE)))
    clashes = {k: v for k, v in names.items() if len(v) > 1}
    assert not clashes, f"modules sharing a name: {clashes}"


def test_the_top_level_holds_only_the_front_door() -> None:
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top == ["__init__", "__main__", "cli", "config"], top


def test_every_speccore_import_names_a_module_that_exists() -> None:
    """mypy skips imports it cannot find (ignore_missing_imports): a relative import left
    pointing at a moved module would only fail when that line runs."""
    modules = set(module_graph())
    missing = []
    for path in PACKAGE.rglob("*.py"):
        here = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = here[: len(here) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
            elif isinstance(node, ast.Import):
                module = next((a.name for a in node.names if a.name.startswith("speccore")), "")
            else:
                continue
            if module.startswith("speccore") and module not in modules:
                missing.append(f"{path.relative_to(PACKAGE)}:{node.lineno} imports {module}")
    assert not missing, "\n".join(missing)
