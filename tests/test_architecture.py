"""The package's shape, checked statically (``ast``; nothing is imported): the layer order, no
import cycles, nothing in ``kvtier/`` imports the benchmarks, no module past a size limit, and a
wheel of ``kvtier/`` only.

Every import counts: module level, inside functions (lazy) and under ``TYPE_CHECKING`` for the
layers; all but the ``TYPE_CHECKING`` ones (they never run) for cycles.  Today's exceptions are
listed here with their numbers: the lists may only shrink.  A test fails when an exception is no
longer needed, so that the list is kept honest — delete the entry then.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kvtier"

# Lowest first: a module may import its own layer and those before it, never one after.  The first
# prefix that matches a module's name gives its layer (kvtier/__init__.py, the public API, is last).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("kvtier.keys", "kvtier.layout", "kvtier.codec", "kvtier.errors", "kvtier.validate",
              "kvtier.hostmem", "kvtier._fs", "kvtier.config", "kvtier.config_checks", "kvtier.config_node")),
    ("tiers", ("kvtier.tiers",)),
    ("policy", ("kvtier.policy",)),
    ("hierarchy", ("kvtier.directory", "kvtier.reservation", "kvtier.mover", "kvtier.hierarchy", "kvtier.memory",
                   "kvtier.prefetch", "kvtier.node")),  # kvtier.node: `kvtier serve` (its clients: kvtier.tiers.node)
    ("transfer", ("kvtier.transfer",)),
    ("integrations", ("kvtier.integrations",)),
    ("entry points", ("kvtier.cli", "kvtier.testing", "kvtier")),
]

# (importer, imported) pairs that run up a layer today.
UPWARD_ALLOWED = {
    ("kvtier.config.schema", "kvtier.tiers"),  # the schema reads the tier registry (§7.5 step 2 moves it)
}

# Import cycles today, each as its sorted set of modules.
CYCLES_ALLOWED: set[tuple[str, ...]] = set()

MAX_LINES = 450
# Modules over MAX_LINES today, with their line counts as a ceiling: they may shrink, never grow.
OVERSIZE_ALLOWED = {
    "kvtier/integrations/vllm_paged.py": 524,
    "kvtier/tiers/cuda.py": 499,
}

# Top-level names outside the wheel that nothing in kvtier/ may import.
OUTSIDE = ("bench", "benchmarks", "tests", "scripts")


@dataclass(frozen=True)
class Import:
    importer: str  # module name, e.g. "kvtier.tiers.disk"
    target: str  # the imported name as written, resolved if relative, e.g. "kvtier.tiers.base.Tier"
    line: int
    type_only: bool  # under ``if TYPE_CHECKING:``


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str, path: Path) -> Iterator[Import]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def walk(node: ast.AST, type_only: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(module, alias.name, child.lineno, type_only)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # from . import x, from ..tiers import y
                    parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*parts, *([child.module] if child.module else [])])
                for alias in child.names:
                    yield Import(module, f"{base}.{alias.name}", child.lineno, type_only)
            elif isinstance(child, ast.If) and _is_type_checking(child):
                yield from walk(child, True)
            else:
                yield from walk(child, type_only)

    yield from walk(ast.parse(path.read_text(), str(path)), False)


def resolve(target: str) -> str | None:
    """The kvtier module ``target`` names (``kvtier.tiers.base.Tier`` -> ``kvtier.tiers.base``), or None."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def edges(*, with_type_only: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for imp in imports_of(module, path):
            target = resolve(imp.target)
            if target is not None and target != module and (with_type_only or not imp.type_only):
                graph[module].add(target)
    return graph


def layer_of(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module}: no layer; add it to LAYERS in {Path(__file__).name}")


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[tuple[str, ...]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(tuple(sorted(component)))
    return sorted(found)


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


def test_no_import_runs_up_a_layer() -> None:
    upward = set()
    for module, targets in edges(with_type_only=True).items():
        upward |= {(module, t) for t in targets if layer_of(t) > layer_of(module)}
    names = [name for name, _ in LAYERS]
    new = sorted(upward - UPWARD_ALLOWED)
    assert not new, "imports that run up a layer (" + " -> ".join(names) + "): " + ", ".join(
        f"{a} ({names[layer_of(a)]}) imports {b} ({names[layer_of(b)]})" for a, b in new)
    assert not UPWARD_ALLOWED - upward, f"fixed, delete from UPWARD_ALLOWED: {sorted(UPWARD_ALLOWED - upward)}"


def test_no_import_cycles() -> None:
    found = set(cycles(edges(with_type_only=False)))
    assert not found - CYCLES_ALLOWED, f"import cycles: {sorted(found - CYCLES_ALLOWED)}"
    assert not CYCLES_ALLOWED - found, f"fixed, delete from CYCLES_ALLOWED: {sorted(CYCLES_ALLOWED - found)}"


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": {"g"}, "g": {"f", "d"}}
    assert cycles(graph) == [("a", "b", "c"), ("f", "g")]


def test_the_directory_never_touches_bytes() -> None:
    """Control apart from data (redesign §7.4): the directory imports no tier and no numpy."""
    found = [f"{imp.target} (line {imp.line})" for imp in imports_of("kvtier.directory", MODULES["kvtier.directory"])
             if imp.target.startswith(("kvtier.tiers", "numpy", "kvtier.hierarchy", "kvtier.mover", "kvtier.prefetch"))]
    assert not found, f"kvtier.directory imports byte movers: {found}"


def test_nothing_in_kvtier_imports_the_benchmarks() -> None:
    found = [f"{imp.importer}:{imp.line} imports {imp.target}"
             for module, path in MODULES.items() for imp in imports_of(module, path)
             if imp.target.partition(".")[0] in OUTSIDE]
    assert not found, f"kvtier/ is the wheel; {', '.join(OUTSIDE)} are not in it: {found}"
    # The one way in is `kvtier bench` / `kvtier demo`, which run the checkout's bench package by name.
    by_name = [f"{module}:{node.lineno}" for module, path in MODULES.items()
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Constant) and isinstance(node.value, str)
               and node.value.partition(".")[0] in OUTSIDE and node.value.partition(".")[1]]
    assert by_name == [f"kvtier.cli:{_line_of(PACKAGE / 'cli.py', 'bench.__main__')}"], by_name


def _line_of(path: Path, needle: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_size(path: Path) -> None:
    rel = str(path.relative_to(ROOT))
    lines = len(path.read_text().splitlines())
    ceiling = OVERSIZE_ALLOWED.get(rel, MAX_LINES)
    assert lines <= ceiling, (f"{rel}: {lines} lines, over {ceiling}" + (
        " (its ceiling in OVERSIZE_ALLOWED: it may shrink, never grow)" if rel in OVERSIZE_ALLOWED
        else f": a module over {MAX_LINES} lines is usually two ideas; split it"))
    if rel in OVERSIZE_ALLOWED and lines <= MAX_LINES:
        pytest.fail(f"{rel}: {lines} lines, within {MAX_LINES}: delete it from OVERSIZE_ALLOWED")


def test_oversize_exceptions_exist() -> None:
    assert not [rel for rel in OVERSIZE_ALLOWED if not (ROOT / rel).is_file()], "delete moved modules' entries"


def test_the_wheel_is_kvtier_only() -> None:
    """pyproject's package discovery, as setuptools runs it for the wheel: kvtier and its subpackages."""
    setuptools = pytest.importorskip("setuptools")
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    finder = setuptools.find_namespace_packages if find.get("namespaces", True) else setuptools.find_packages
    packages = finder(str(ROOT), include=find["include"], exclude=find.get("exclude", ()))
    assert "kvtier" in packages and "kvtier.tiers" in packages
    assert [p for p in packages if p.partition(".")[0] != "kvtier"] == []
    assert [p for p in packages if p.startswith("kvtier.bench")] == []  # the benchmarks were kvtier/bench/
    assert (ROOT / "bench" / "__main__.py").is_file()  # ...and bench/ exists, outside it
