"""Core knows strategies only through paraflow.plugin: no module of paraflow/ (the installed
strategies package aside) imports a concrete strategy, and the planner asks no strategy what
type it is."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

CORE = REPO / "paraflow"


def _core_modules() -> list[Path]:
    strategies = CORE / "strategies"  # the link that installs strategies/ as paraflow.strategies
    return [p for p in CORE.rglob("*.py") if strategies not in p.parents]


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return found


def test_core_imports_no_concrete_strategy() -> None:
    modules = _core_modules()
    assert len(modules) > 40  # the walk found the package
    bad = {str(p.relative_to(REPO)): m for p in modules for m in _imports(p)
           if m.startswith(("paraflow.strategies.", "strategies."))}
    assert not bad, bad


def test_the_planner_does_not_ask_a_strategy_its_type() -> None:
    for path in (CORE / "plan").glob("*.py"):
        text = path.read_text()
        assert "isinstance(strategy" not in text and "getattr(strategy" not in text, path
