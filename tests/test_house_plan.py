"""The plan of the house (docs/design.md), checked: each unit imports only units below it, no import cycles, no
module longer than about 700 lines, no frame inspection, and every module is named on the Design page.

A *unit* is a top-level module or sub-package of `tl_plugin` (``tl_plugin.callbacks``, ``tl_plugin.optim``). The
ranks below are the floors of docs/design.md, lowest first; a unit may import its own modules and any unit of a lower
floor, never one of the same or a higher floor. The applications (``app``, ``cli``, ``data``, ``tune``) count as one
unit. Imports inside functions count too; imports under ``if TYPE_CHECKING:`` (annotations only) do not.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tl_plugin"

#: Floors of the house, lowest first (docs/design.md has the same table).
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("argument checks", ("checks",)),
    ("foundations", ("discovery", "distributed", "logme", "metrics", "testing", "vision")),
    ("model surgery", ("config", "freezing", "losses", "optim")),
    ("transfer plans", ("transfer",)),
    ("freeze schedules", ("schedule",)),
    ("Trainer callbacks", ("callbacks",)),
    ("frozen-prefix engine and tools", ("prefix", "plotting", "lr_finder", "scan")),
    ("former import paths", ("cache", "last_block", "perf")),
    ("Trainer owners", ("trainer", "training")),
    ("front door", ("__init__",)),
    ("applications", ("applications",)),
]
#: The applications are one unit: the command line, its data loading, the search and their import paths.
APPLICATIONS = ("app", "cli", "data", "tune")
RANK = {unit: rank for rank, (_, units) in enumerate(FLOORS) for unit in units}
MAX_LINES = 720


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(name: str) -> str:
    parts = name.split(".")
    unit = parts[1] if len(parts) > 1 else "__init__"
    return "applications" if unit in APPLICATIONS else unit


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """The tl_plugin modules `path` imports, anywhere in it (relative imports resolved)."""
    name = module_name(path).split(".")
    package = name if path.name == "__init__.py" else name[:-1]
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    type_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for statement in node.body
        for inner in ast.walk(statement)
    }  # imports for type annotations only: never run
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            for candidate in [module, *(f"{module}.{alias.name}" for alias in node.names)]:
                if candidate in MODULES:
                    found.add(candidate)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in MODULES)
    found.discard(module_name(path))
    return found


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def test_every_unit_has_a_floor():
    units = {unit_of(name) for name in MODULES}
    assert units <= set(RANK), f"units without a floor in FLOORS / docs/design.md: {sorted(units - set(RANK))}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_module_imports_only_floors_below_its_own(name: str):
    unit = unit_of(name)
    upward = sorted(
        target for target in GRAPH[name]
        if unit_of(target) != unit and RANK.get(unit_of(target), -1) >= RANK.get(unit, -1)
    )  # fmt: skip
    assert not upward, f"{name} (floor {RANK.get(unit)}) imports {upward}, which are not below it"


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    assert _cycles() == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_much_longer_than_700_lines(name: str):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines: split it by concern"


def test_nothing_inspects_the_call_stack():
    pattern = re.compile(r"sys\._getframe|inspect\.(stack|currentframe|getouterframes)|\bf_back\b")
    found = [name for name, path in MODULES.items() if pattern.search(path.read_text())]
    assert found == []


def test_the_design_page_names_every_module_and_the_same_floors():
    page = (ROOT / "docs" / "design.md").read_text()
    def named(name: str) -> bool:  # as `tl_plugin.app.data`, `app.data`, or a top-level unit's own name
        short = name.removeprefix("tl_plugin.")
        return any(f"`{form}`" in page for form in (name, short, short.split(".")[0] if "." not in short else name))

    missing = [name for name in MODULES if not named(name)]
    assert missing == [], f"docs/design.md does not name: {missing}"
    for title, _ in FLOORS:
        assert title in page, f"docs/design.md lacks the floor {title!r}"


def test_the_readme_layout_lists_every_module():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    layout = layout[: layout.find("\n## ", 1) if "\n## " in layout[1:] else len(layout)]
    missing = []
    for name in MODULES:
        parts = name.split(".")[1:] or ["tl_plugin"]
        last = parts[-1] if parts[-1] != "__init__" else parts[-2]
        if name == "tl_plugin" or f"`{last}`" in layout or f"`{last}/`" in layout or f"`{'/'.join(parts[-2:])}`" in layout:
            continue
        if f"`tl_plugin/{'/'.join(parts)}.py`" in layout or f"`tl_plugin/{'/'.join(parts)}/`" in layout:
            continue
        missing.append(name)
    assert missing == [], f"README's Layout does not list: {missing}"
