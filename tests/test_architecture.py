"""The layout shows the architecture, and these tests keep it that way.

- ``data/`` and ``detectors/`` are the ground floor: they never import ``unmask/``.
- ``unmask/`` is layered by concern; a sub-package imports only from layers below it.
- No module imports itself back through another (no cycles), lazy imports included.
- The entry scripts stay thin: compose, then call one task.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "detectors", "unmask")
# Lowest first: each may import the ground floor and the layers before it.
LAYERS = ("core", "reports", "scoring", "explain", "evaluation", "robustness", "audit", "service", "tasks")
# Package-level command modules (``python -m unmask.<name>``; ``cli``: the Hydra apps of the
# console commands and the root scripts): thin, above every layer; no layer imports them.
COMMANDS = ("slim", "cli", "leaderboard")
ENTRY_SCRIPTS = ("train.py", "infer.py", "evaluate.py", "pretrain_osn.py", "audit.py", "serve.py")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """Project modules ``path`` imports, at any depth of the file (lazy imports too); ``from
    pkg import name`` counts as ``pkg.name`` when that is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def project_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    modules = set(files)
    return {name: imported_modules(path, modules) - {name} for name, path in files.items()}


GRAPH = project_graph()


def test_the_graph_sees_the_project():
    assert {"unmask.scoring.scorer", "data.dataset", "detectors.base"} <= set(GRAPH)
    assert "unmask.scoring.runtimes" in GRAPH["unmask.scoring.scorer"]  # imports are found


@pytest.mark.parametrize("floor", ["data", "detectors"])
def test_ground_floor_never_imports_unmask(floor):
    offenders = {m: sorted(d for d in deps if d.startswith("unmask")) for m, deps in GRAPH.items() if m.startswith(floor + ".")}
    assert not {m: d for m, d in offenders.items() if d}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "unmask" and len(parts) > 1 else None


def test_unmask_subpackages_are_the_layers():
    found = {p.name for p in (ROOT / "unmask").iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert found == set(LAYERS), "a new sub-package needs its place in LAYERS"
    loose = sorted(p.name for p in (ROOT / "unmask").glob("*.py") if p.name != "__init__.py" and p.stem not in COMMANDS)
    assert not loose, f"modules outside the layers: {loose}"


def test_layers_import_only_downwards():
    upward = []
    for module, deps in GRAPH.items():
        layer = layer_of(module)
        if layer is None or layer in COMMANDS:
            continue
        allowed = set(LAYERS[: LAYERS.index(layer) + 1])
        upward += [f"{module} -> {d}" for d in deps if layer_of(d) is not None and layer_of(d) not in allowed]
    assert not upward, "imports that climb a layer:\n" + "\n".join(sorted(upward))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state[dep] == 1:
                return stack[stack.index(dep):] + [dep]
            if state[dep] == 0 and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state[node] == 0 and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


def test_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("script", ENTRY_SCRIPTS)
def test_entry_scripts_are_thin(script):
    path = ROOT / script
    code = [line for line in path.read_text().splitlines() if line.strip() and not line.strip().startswith("#")]
    assert len(code) <= 25, f"{script} has {len(code)} lines of code: move the work into unmask/tasks/"
    modules = {m for m in imported_modules(path, set(GRAPH)) if m.startswith("unmask")}
    # a task, or the Hydra app it shares with its console command (unmask.cli, which calls the task)
    assert modules <= {"unmask.core.config", "unmask.cli"} | {m for m in GRAPH if m.startswith("unmask.tasks.")}
    assert any(m.startswith("unmask.tasks.") or m == "unmask.cli" for m in modules), f"{script} calls no task"


@pytest.mark.parametrize("app", ["train", "infer", "evaluate"])
def test_console_apps_only_call_their_task(app):
    """unmask/cli.py is as thin as the scripts: each app imports its task's module, nothing else of the package."""
    tree = ast.parse((ROOT / "unmask" / "cli.py").read_text())
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == app)
    assert {n.module for n in ast.walk(function) if isinstance(n, ast.ImportFrom)} == {f"unmask.tasks.{app}"}
    assert len(function.body) <= 4
