"""The layout's rules (docs/structures.md): small folders of small modules, no import cycle, and a
code map that names every package folder.

The layer rules themselves (which folder may import which) are import-linter contracts in
pyproject.toml, checked by `make lint`.
"""

import re
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("orchestrator", "services")
GENERATED = ROOT / "services" / "proto"
MAX_MODULES = 12
MAX_LINES = 300


def package_folders() -> list[Path]:
    """Every folder of the two packages that is a package (the generated stubs' folders aside)."""
    folders = [p.parent for pkg in PACKAGES for p in (ROOT / pkg).rglob("__init__.py")]
    return sorted(f for f in folders if GENERATED not in (f, *f.parents))


def modules(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("folder", package_folders(), ids=lambda f: str(f.relative_to(ROOT)))
def test_a_folder_holds_at_most_twelve_modules(folder):
    names = [p.name for p in modules(folder)]
    assert len(names) <= MAX_MODULES, f"{folder.relative_to(ROOT)} holds {len(names)} modules: {names}"


def test_no_module_is_over_300_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for folder in package_folders()
        for p in [*modules(folder), folder / "__init__.py"]
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them by responsibility): {long}"


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph)))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


def test_strongly_connected_finds_a_cycle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules():
    """Every import counts: at module level, inside functions and under TYPE_CHECKING."""
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) & graph.modules for m in graph.modules}
    assert strongly_connected(edges) == []


def test_the_code_map_names_every_package_folder():
    text = (ROOT / "docs" / "structures.md").read_text()
    named = set(re.findall(r"`([a-z_/]+)/`", text))
    missing = [str(f.relative_to(ROOT)) for f in package_folders() if str(f.relative_to(ROOT)) not in named]
    assert not missing, f"docs/structures.md does not name these folders: {missing}"
