"""Imports go one way: search -> covidnet_jax, and inside search
config -> ledger -> {strategies, reporting} -> execution -> {commands, cli}.

Checked on the source (every `import`/`from ... import`, including function-local ones), so a
lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What each part may import from `search` (besides itself).
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "ledger": {"config"},
    "strategies": {"config", "ledger"},
    "reporting": {"config", "ledger"},
    "execution": {"config", "ledger", "strategies", "reporting"},
    "commands": {"config", "ledger", "strategies", "reporting", "execution", "__init__"},
    "cli": {"commands"},
    "__init__": {"execution", "strategies"},
}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "search":
                found.extend((node.lineno, f"search.{alias.name}") for alias in node.names)
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
    return found


def _source_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", _source_files("covidnet_jax"), ids=lambda p: p.name)
def test_the_library_never_imports_search(path: Path) -> None:
    bad = [(line, m) for line, m in _imported_modules(path) if m.split(".")[0] == "search"]
    assert not bad, f"{path.relative_to(ROOT)} imports the search package: {bad}"


@pytest.mark.parametrize("path", _source_files("search"), ids=lambda p: str(p.relative_to(ROOT)))
def test_search_parts_import_one_way(path: Path) -> None:
    rel = path.relative_to(ROOT).with_suffix("")
    own = rel.parts[1] if len(rel.parts) > 1 else "__init__"
    bad = []
    for line, module in _imported_modules(path):
        if module.split(".")[0] != "search" or module == "search":
            continue
        target = _part(module)
        if target != own and target not in ALLOWED[own]:
            bad.append(f"line {line}: {module}")
    assert not bad, f"{rel} ({own}) imports against the direction: {bad}"
