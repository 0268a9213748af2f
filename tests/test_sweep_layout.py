"""The sweeps package and the CLI keep their shape: no import circle (type-only and
function-level imports included), modules of at most ~600 lines, and nothing below them
imports them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "aioproj"
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every aioproj module ``path`` imports, wherever the import statement sits."""
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # ``from aioproj.sweeps import engine`` imports a module, not a name
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "aioproj" or name.startswith("aioproj.")}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in ROOT.rglob("*.py")}
    return {name: _imports(path) & set(modules) for name, path in modules.items()}


def _in_scope(name: str) -> bool:
    return name.startswith("aioproj.sweeps") or name in {
        "aioproj.cli",
        "aioproj._cli_common",
        "aioproj._cli_sweep",
    }


def _cycle(graph: dict[str, set[str]], nodes: set[str]) -> list[str] | None:
    """A circle of imports among ``nodes``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node] & nodes):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(nodes):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle_in_sweeps_and_the_cli() -> None:
    graph = _graph()
    scope = {name for name in graph if _in_scope(name)}
    assert "aioproj.sweeps.engine" in scope
    assert _cycle(graph, scope) is None, " -> ".join(_cycle(graph, scope) or [])


def test_sweep_modules_import_siblings_not_their_package() -> None:
    graph = _graph()
    for name, imported in graph.items():
        if name.startswith("aioproj.sweeps."):
            assert "aioproj.sweeps" not in imported, name


def test_only_the_top_imports_sweeps_and_the_cli() -> None:
    graph = _graph()
    for name, imported in graph.items():
        if _in_scope(name) or name in ("aioproj", "aioproj.__main__"):
            continue
        assert not {m for m in imported if _in_scope(m)}, name


@pytest.mark.parametrize(
    "path",
    sorted([*ROOT.joinpath("sweeps").glob("*.py"), *ROOT.glob("*cli*.py")]),
    ids=lambda p: p.name,
)
def test_modules_stay_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines"
