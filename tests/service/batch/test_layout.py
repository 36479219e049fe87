"""The batch package's layers, read from the source: each module imports only the ones below it.

A runner (local, queue) may use the pure layers; the pure layers never reach up to a runner, and
the package's `__init__` is the only place that chooses between the runners.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[3] / "service" / "batch"
LAYERS = {
    "request": 0,
    "connect": 1,
    "items": 2,
    "report": 2,
    "selection": 2,
    "local": 3,
    "queue": 3,
    "__init__": 4,
}


def batch_imports(module: str) -> set[str]:
    """The `service.batch` modules that `module` imports, anywhere in its source."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name == "service.batch":
                found.add("__init__")
            elif name.startswith("service.batch."):
                found.add(name.split(".")[2])
    return found


def test_every_module_of_the_package_has_a_layer() -> None:
    assert {p.stem for p in PACKAGE.glob("*.py")} == set(LAYERS)


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_a_batch_module_imports_only_modules_below_it(module: str) -> None:
    above = {m for m in batch_imports(module) if LAYERS[m] >= LAYERS[module]}
    assert not above, f"service.batch.{module} imports {sorted(above)}, not below it"
