"""The house rules of the import graph, read from the source of every module.

``docs/architecture.md`` draws the layers; this test keeps the code that way. Every import
counts, also those inside functions (lazy imports) and under ``TYPE_CHECKING``: a lazy import
still ties the packages together, it only delays the cost.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Each top-level package and the packages it may import. Read it bottom-up: ``common`` is the
#: floor, ``spillway`` (the command and the processes it starts) the top.
MAY_IMPORT: dict[str, frozenset[str]] = {
    "common": frozenset(),
    "providers": frozenset({"common"}),
    "decisions": frozenset({"common", "providers"}),
    "agent": frozenset({"common"}),
    "scheduler": frozenset({"common", "providers", "decisions"}),
    "simulator": frozenset({"common", "providers", "decisions", "agent"}),
    "workflows": frozenset({"common", "providers", "decisions", "scheduler"}),
    "gateway": frozenset({"common", "providers", "decisions"}),
    "spillway": frozenset(
        {"common", "providers", "decisions", "agent", "scheduler", "simulator", "workflows"}
        | {"gateway"}
    ),
}

#: Generated code is not held to the line limit.
GENERATED = ("_pb2.py", "_pb2_grpc.py")
MAX_LINES = 650


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for top in MAY_IMPORT:
        for path in sorted((ROOT / top).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imported(path: Path, module: str) -> Iterator[str]:
    """Every name ``module`` imports: ``import a.b`` gives ``a.b``; ``from a import b`` gives
    ``a`` and ``a.b`` (``b`` may be a submodule); relative imports are resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for name in _imported(path, module):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                edges[module].add(name)
    return edges


def test_every_top_level_package_is_in_the_table() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    # tests/ and bench/ are not the product: they may import any package; no package of the
    # product may import them (they are in no row of the table).
    assert packages <= set(MAY_IMPORT) | {"tests", "bench"}, sorted(packages - set(MAY_IMPORT))


def test_imports_between_packages_run_one_way() -> None:
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in targets
        if (a := module.split(".")[0]) != (b := target.split(".")[0]) and b not in MAY_IMPORT[a]
    )
    assert not wrong, "imports against the layers of docs/architecture.md:\n" + "\n".join(wrong)


def test_the_table_itself_has_no_cycle() -> None:
    seen: set[str] = set()

    def visit(package: str, path: tuple[str, ...]) -> None:
        assert package not in path, " -> ".join((*path, package))
        if package in seen:
            return
        for lower in MAY_IMPORT[package]:
            visit(lower, (*path, package))
        seen.add(package)

    for package in MAY_IMPORT:
        visit(package, ())


def test_no_two_modules_import_each_other() -> None:
    """Tarjan's strongly connected components over the module graph: none may hold two."""
    edges = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
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
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            connect(module)
    assert not cycles, "modules that import each other: " + "; ".join(map(" <-> ".join, cycles))


def test_no_module_is_too_long() -> None:
    long = {
        name: n
        for name, path in _modules().items()
        if not path.name.endswith(GENERATED)
        and (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"split these modules (over {MAX_LINES} lines): {long}"


def test_the_checker_sees_a_wrong_way_import(tmp_path: Path) -> None:
    """The reader resolves relative and lazy imports, so a violation cannot hide in one."""
    module = tmp_path / "mod.py"
    module.write_text("def f():\n    from ..scheduler import fleet\n    import workflows.types\n")
    names = set(_imported(module, "decisions.sub.mod"))
    assert {"decisions.scheduler.fleet", "workflows.types"} <= names
    module.write_text("from . import policy\n")
    assert "decisions.policy" in set(_imported(module, "decisions.mod"))
