"""The house plan: the library never imports the applications.

Applications: `tl_plugin.app` (command line, data loading, tasks, reports, the demo's data) and the modules that
front it (`tl_plugin.cli`, `tl_plugin.data`, `tl_plugin.tune`'s trials). Every other module is library. The check
reads every import statement of every library module, including imports inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tl_plugin"
APPLICATION_MODULES = ("tl_plugin.app", "tl_plugin.cli", "tl_plugin.data", "tl_plugin.tune")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_application(name: str) -> bool:
    return any(name == app or name.startswith(app + ".") for app in APPLICATION_MODULES)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules imported anywhere in `path` (relative imports resolved)."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


LIBRARY = sorted(p for p in PACKAGE.rglob("*.py") if not is_application(module_name(p)))


def test_the_split_finds_both_layers():
    names = {module_name(p) for p in LIBRARY}
    assert {"tl_plugin.discovery", "tl_plugin.freezing", "tl_plugin.config", "tl_plugin.transfer", "tl_plugin.optim",
            "tl_plugin.callbacks", "tl_plugin.cache"} <= names  # fmt: skip
    assert not any(is_application(n) for n in names)
    assert (PACKAGE / "app" / "cli.py").is_file()


@pytest.mark.parametrize("path", LIBRARY, ids=module_name)
def test_library_module_never_imports_the_applications(path: Path):
    upward = sorted(n for n in imported_modules(path) if is_application(n))
    assert not upward, f"{module_name(path)} imports the application layer: {upward}"


def test_the_check_sees_relative_and_function_level_imports(tmp_path: Path):
    fake = PACKAGE / "callbacks" / "_layering_probe.py"
    fake.write_text("def f():\n    from ..app.train import run_train\n    from .. import tune\n")
    try:
        assert {"tl_plugin.app.train", "tl_plugin.tune"} <= imported_modules(fake)
    finally:
        fake.unlink()
