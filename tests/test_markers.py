"""The slow marker is where it belongs: every test that loads a packaged model, starts Ray, signals
or starts another process carries it, so ``pytest -m "not slow"`` stays fast.

Read from the test files' syntax trees (no collection, no imports): a test counts with what its
own body, the fixtures it asks for and the module's helpers it calls do, transitively.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REAL_MODELS = {"smollm2-135m", "gemma-3-270m"}
# Calls that load (or convert) the model they are given, directly or through the CLI.
LOADERS = {"load_model", "converted_folder", "main", "from_pretrained"}


@dataclass
class Module:
    path: Path
    functions: dict[str, ast.FunctionDef] = field(default_factory=dict)
    fixtures: dict[str, ast.FunctionDef] = field(default_factory=dict)
    tests: list[ast.FunctionDef] = field(default_factory=list)
    slow_module: bool = False


def _is_slow_mark(node: ast.expr) -> bool:
    """``pytest.mark.slow``, called or not, alone or in a list."""
    if isinstance(node, ast.Call):
        return _is_slow_mark(node.func)
    if isinstance(node, ast.List | ast.Tuple):
        return any(_is_slow_mark(e) for e in node.elts)
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "slow"
        and _dotted(node) == "pytest.mark.slow"
    )


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def _is_fixture(fn: ast.FunctionDef) -> bool:
    return any(
        "fixture" in _dotted(d.func if isinstance(d, ast.Call) else d) for d in fn.decorator_list
    )


def parse(path: Path) -> Module:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    module = Module(path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets
        ):
            module.slow_module = _is_slow_mark(node.value)
        functions = [node] if isinstance(node, ast.FunctionDef) else []
        if isinstance(node, ast.ClassDef):
            functions = [n for n in node.body if isinstance(n, ast.FunctionDef)]
        for fn in functions:
            if _is_fixture(fn):
                module.fixtures[fn.name] = fn
            elif fn.name.startswith("test_"):
                module.tests.append(fn)
            else:
                module.functions[fn.name] = fn
    return module


def own_reasons(fn: ast.FunctionDef) -> set[str]:
    """What makes this function's own body slow (nested functions included)."""
    reasons: set[str] = set()
    strings = {
        n.value for n in ast.walk(fn) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }
    called: set[str] = set()
    for node in ast.walk(fn):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        called.add(name.rsplit(".", 1)[-1])
        if name == "ray.init":
            reasons.add("starts Ray")
        if name.endswith(".send_signal"):
            reasons.add("signals a subprocess")
        if name in {"subprocess.Popen", "subprocess.run", "Popen"}:
            reasons.add("starts a subprocess")
        if name.endswith("from_pretrained") and any(
            k.arg == "gguf_file" and isinstance(k.value, ast.Constant) for k in node.keywords
        ):
            reasons.add("reads a packaged GGUF")
    if strings & REAL_MODELS and called & LOADERS:
        reasons.add("loads a packaged model")
    return reasons


def reasons_of(test: ast.FunctionDef, module: Module, conftest: Module) -> set[str]:
    """The test's reasons, with those of the fixtures it asks for and the helpers it calls."""
    fixtures = {**conftest.fixtures, **module.fixtures}
    reasons: set[str] = set()
    seen: set[str] = set()
    todo: list[ast.FunctionDef] = [test]
    while todo:
        fn = todo.pop()
        reasons |= own_reasons(fn)
        args = [a.arg for a in (*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs)]
        names = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
        for name in args:
            if name in fixtures and f"fixture:{name}" not in seen:
                seen.add(f"fixture:{name}")
                todo.append(fixtures[name])
        for name in names:
            if name in module.functions and name not in seen:
                seen.add(name)
                todo.append(module.functions[name])
    return reasons


def marked_slow(test: ast.FunctionDef, module: Module) -> bool:
    return module.slow_module or any(_is_slow_mark(d) for d in test.decorator_list)


def heavy_tests() -> dict[str, tuple[set[str], bool]]:
    """``file::test`` → (its reasons to be slow, whether it is marked) for every test with one."""
    conftest = parse(TESTS / "conftest.py")
    out: dict[str, tuple[set[str], bool]] = {}
    for path in sorted(TESTS.glob("test_*.py")):
        module = parse(path)
        for test in module.tests:
            if reasons := reasons_of(test, module, conftest):
                out[f"{path.name}::{test.name}"] = (reasons, marked_slow(test, module))
    return out


def test_every_heavy_test_is_marked_slow() -> None:
    unmarked = {name: sorted(r) for name, (r, marked) in heavy_tests().items() if not marked}
    assert not unmarked, f"add @pytest.mark.slow to: {unmarked}"


def test_the_scan_finds_the_known_heavy_tests() -> None:
    """Not vacuous: each kind of reason is found where it is known to be."""
    found = {name: r for name, (r, _) in heavy_tests().items()}
    expected = {
        "test_ray_engine.py::test_subset_of_indices_matches_local_scoring": "starts Ray",
        "test_cli.py::test_real_alias_end_to_end": "loads a packaged model",
        "test_models.py::test_smollm2_loads_and_reloads_from_the_cache": "loads a packaged model",
        "test_data_tokenize.py::test_real_smollm2_chat_tokenisation": "reads a packaged GGUF",
        "test_run_folder.py::test_sigterm_in_the_cli_saves_and_exits_143_with_one_line": (
            "signals a subprocess"
        ),
        "test_resume.py::test_scoring_killed_with_sigkill_resumes_to_identical_scores": (
            "signals a subprocess"
        ),
        "test_one_path.py::test_generation_prompts_equal_the_prompt_part_of_training_ids_packaged": (
            "loads a packaged model"
        ),
    }
    for name, reason in expected.items():
        assert reason in found.get(name, set()), (name, found.get(name))
    # Naming a packaged model without loading it is cheap: resolving an alias stays fast.
    assert "test_models.py::test_smollm2_alias_points_at_the_packaged_gguf" not in found


def test_the_scan_reads_marks_and_fixtures(tmp_path: Path) -> None:
    source = """
import pytest, ray

pytestmark = [pytest.mark.filterwarnings("ignore")]

@pytest.fixture
def cluster():
    ray.init(num_cpus=1)

def helper(proc):
    proc.send_signal(15)

def test_uses_fixture(cluster): ...

def test_calls_helper(): helper(None)

@pytest.mark.slow
def test_marked(cluster): ...

def test_names_only(): assert "smollm2-135m"
"""
    path = tmp_path / "test_x.py"
    path.write_text(source, encoding="utf-8")
    module, conftest = parse(path), Module(tmp_path / "conftest.py")
    got = {t.name: (reasons_of(t, module, conftest), marked_slow(t, module)) for t in module.tests}
    assert got == {
        "test_uses_fixture": ({"starts Ray"}, False),
        "test_calls_helper": ({"signals a subprocess"}, False),
        "test_marked": ({"starts Ray"}, True),
        "test_names_only": (set(), False),
    }
