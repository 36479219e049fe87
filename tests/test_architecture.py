"""The layout rules of docs/architecture.md, checked on the source itself (no import of it).

- no import cycle between the project's modules (function-level imports count too: a cycle
  hidden inside a function is still a cycle);
- `fhir_adapters` imports nothing from `service` (the FHIR side knows nothing of the service);
- no module over `MAX_LINES` lines (database migrations aside): a long module does two jobs;
- docs/architecture.md names every module, so the layout a newcomer reads is the real one.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("service", "fhir_adapters")
MAX_LINES = 600
NOT_CODE = ("migrations",)  # generated schema steps, one long function each by design


def _module_files() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if any(p in NOT_CODE for p in parts):
                continue
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


MODULES = _module_files()


def _imported(path: Path, name: str) -> Iterator[str]:
    """The project modules one module imports, anywhere in it (TYPE_CHECKING blocks aside)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            # The longest prefix that is a project module: `a.b.name` -> `a.b` when name is not a module.
            parts = target.split(".")
            while parts and ".".join(parts) not in MODULES:
                parts.pop()
            if parts and ".".join(parts) != name:
                yield ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    return {name: set(_imported(path, name)) for name, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted, the list sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_the_cycle_finder_finds_a_hidden_cycle_and_ignores_a_chain() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_there_is_no_import_cycle() -> None:
    found = cycles(import_graph())
    assert found == [], "import cycles (break each by moving what both need below both):\n" + "\n".join(
        " <-> ".join(group) for group in found
    )


def test_the_import_graph_sees_the_project() -> None:
    graph = import_graph()
    assert len(graph) > 50
    assert "fhir_adapters.fetch" in graph["service.pipeline"]


def test_fhir_adapters_import_nothing_from_service() -> None:
    offenders = sorted(
        f"{name} imports {target}"
        for name, targets in import_graph().items()
        if name.startswith("fhir_adapters")
        for target in targets
        if target.split(".")[0] == "service"
    )
    assert offenders == []


def test_no_module_is_over_the_line_limit() -> None:
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in MODULES.items()}
    over = sorted(f"{MODULES[n].relative_to(ROOT)}: {lines}" for n, lines in sizes.items() if lines > MAX_LINES)
    assert over == [], f"modules over {MAX_LINES} lines (split each by job):\n" + "\n".join(over)


def test_the_architecture_doc_names_every_module() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    unnamed = sorted(
        str(path.relative_to(ROOT))
        for path in MODULES.values()
        if path.read_text(encoding="utf-8").strip() and f"`{path.relative_to(ROOT)}`" not in doc
    )
    assert unnamed == [], "modules docs/architecture.md does not name (add one line each):\n" + "\n".join(unnamed)
