"""The package's house rules, checked on the source: imports run one way, down the path of a
boot; no import cycles; no imports hidden inside functions; no private names across modules.

These are the rules that let a contributor read ``harness/`` package by package: each stage
depends only on the stages before it, so it can be understood (and tested) without the ones
after it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "harness"

# The path of one boot. A module may import from its own layer and the layers before it.
LAYERS = (
    (
        "outcome",
        "tools",
        "cache",
        "cachefs",
        "manifest",
        "compression",
        "lifeline",
        "upkeep",
        "lazyimport",
    ),
    ("kernel",),
    ("image",),
    ("storage",),
    ("vm",),
    ("snapshot",),
    ("bisect",),
    ("report",),
    ("plugin",),
    ("cli",),
)


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = modules()


def imported(node: ast.ImportFrom | ast.Import, module: str) -> Iterator[tuple[str, list[str]]]:
    """(module imported, names taken from it) for one import statement."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name, []
        return
    base = node.module or ""
    if node.level:
        package = module.split(".")
        if MODULES[module].name != "__init__.py":
            package = package[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, base] if base else package)
    for alias in node.names:
        candidate = f"{base}.{alias.name}"
        if candidate in MODULES:
            yield candidate, []
        else:
            yield base, [alias.name]


def top_level_imports(module: str) -> Iterator[tuple[ast.stmt, str, list[str]]]:
    """Imports at module level (also under ``if TYPE_CHECKING:``, which still ties the two)."""
    tree = ast.parse(MODULES[module].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            for target, names in imported(node, module):
                if target == "harness" or target.startswith("harness."):
                    yield node, target, names


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) < 2:
        return 0
    for index, members in enumerate(LAYERS):
        if parts[1] in members:
            return index
    raise AssertionError(f"{module}: not in any layer of LAYERS; add its package there")


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for _, target, _ in top_level_imports(module):
            if target in MODULES and target != module:
                edges[module].add(target)
    return edges


def test_no_import_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_run_down_the_boot_path() -> None:
    wrong = []
    for module in MODULES:
        for node, target, _ in top_level_imports(module):
            if target == "harness":
                continue
            if layer_of(target) > layer_of(module):
                wrong.append(
                    f"{MODULES[module].relative_to(PACKAGE.parent)}:{node.lineno}: "
                    f"{module} imports {target}, a later stage"
                )
    assert not wrong, "\n".join(wrong)


def test_no_imports_inside_functions() -> None:
    hidden = []
    for _module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                for node in ast.walk(func):
                    if isinstance(node, ast.Import | ast.ImportFrom):
                        hidden.append(
                            f"{path.relative_to(PACKAGE.parent)}:{node.lineno} in {func.name}()"
                        )
    assert not hidden, "imports inside functions:\n" + "\n".join(hidden)


def test_no_private_names_across_modules() -> None:
    uses = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases: dict[str, str] = {}
        for node, target, names in top_level_imports(module):
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    uses.append(
                        f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: imports {target}.{name}"
                    )
            if not names and isinstance(node, ast.ImportFrom | ast.Import):
                for alias in node.names:
                    aliases[alias.asname or alias.name.split(".")[-1]] = target
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                uses.append(
                    f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.value.id}.{node.attr}"
                )
    assert not uses, "private names used across modules:\n" + "\n".join(uses)


@pytest.mark.parametrize("package", sorted(m for m in MODULES if MODULES[m].name == "__init__.py"))
def test_every_package_says_what_lives_there(package: str) -> None:
    doc = ast.get_docstring(ast.parse(MODULES[package].read_text())) or ""
    assert len(doc.split()) >= 12, f"{package}: the package docstring should say what lives there"
