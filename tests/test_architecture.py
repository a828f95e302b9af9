"""The layering docs/architecture.md describes, checked on the source: which package may import which.

bench -> orchestration -> serving -> lora_assets -> registry: each package may import the ones to its right and
never one to its left, and only orchestration (and bench, tests) may import dagster (one named exception:
`dagster_pipes` in the torchrun entry point). Functions in the lower three are short, and no registry table is
named in SQL outside registry/, each with its known exceptions by name.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["bench", "orchestration", "serving", "lora_assets", "registry"]
OURS = set(LAYERS)


def _imports(path: Path) -> set[str]:
    """The top-level package of every absolute import in a file (`from a.b import c` -> `a`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", LAYERS[1:])
def test_no_package_imports_a_layer_above_it(package):
    allowed = set(LAYERS[LAYERS.index(package) :])
    upward = {
        f"{p.relative_to(ROOT)} imports {imp}"
        for p in sorted((ROOT / package).rglob("*.py"))
        for imp in _imports(p) & OURS
        if imp not in allowed
    }
    assert not upward, f"{package} may import only {sorted(allowed)}: " + "; ".join(sorted(upward))


#: The one module outside orchestration/ that may import a Dagster library: the torchrun entry point imports
#: `dagster_pipes`, the dependency-free library a process *launched by* Dagster uses to talk back to it (logs,
#: progress), never `dagster` itself; it trains all the same when it is missing or not launched through Pipes.
DAGSTER_LIBRARY_EXCEPTIONS = {("lora_assets/distributed.py", "dagster_pipes")}


def _is_dagster_library(top_level: str) -> bool:
    return top_level == "dagster" or top_level.startswith("dagster_")


@pytest.mark.parametrize("package", ["serving", "lora_assets", "registry"])
def test_only_orchestration_imports_dagster(package):
    found = {
        (str(p.relative_to(ROOT)), imp)
        for p in sorted((ROOT / package).rglob("*.py"))
        for imp in _imports(p)
        if _is_dagster_library(imp)
    }
    assert not found - DAGSTER_LIBRARY_EXCEPTIONS, f"pure logic must not import a Dagster library: {sorted(found)}"


#: Functions in registry/, lora_assets/ and serving/ over MAX_FUNCTION_LINES lines, by name: known, each to be
#: split; the test fails when one is added and when one of these is fixed (then remove it here and in the doc).
MAX_FUNCTION_LINES = 60
LONG_FUNCTIONS = {"lora_assets/export.py:export_merged"}


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _functions(tree: ast.Module) -> Iterator[tuple[str, ast.AST]]:
    """(qualified name, node) of every function and method in a module, nested ones included."""

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, ast.AST]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                if not isinstance(child, ast.ClassDef):
                    yield prefix + child.name, child
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    return walk(tree, "")


def test_functions_fit_on_a_screen():
    long = {
        f"{p.relative_to(ROOT)}:{name}": node.end_lineno - node.lineno + 1
        for package in ("registry", "lora_assets", "serving")
        for p in sorted((ROOT / package).rglob("*.py"))
        for name, node in _functions(_parse(p))
        if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    }
    assert set(long) == LONG_FUNCTIONS, (
        f"functions over {MAX_FUNCTION_LINES} lines: {long}; known: {sorted(LONG_FUNCTIONS)}. Split a new one; "
        "remove a fixed one from LONG_FUNCTIONS and docs/architecture.md"
    )


def _registry_relations() -> set[str]:
    """Every table and view the registry's migrations create, read from a fresh in-memory registry."""
    import duckdb

    from registry.schema import migrate

    con = duckdb.connect(":memory:")
    migrate(con, Path(":memory:"))
    tables = con.execute(
        "SELECT table_name FROM duckdb_tables() UNION SELECT view_name FROM duckdb_views() WHERE NOT internal"
    )
    return {name for (name,) in tables.fetchall()}


#: Where registry tables are named in SQL outside registry/, by design: the registry benchmark fills a registry
#: with 100,000 rows in one INSERT (`fill`) and times the registry's queries against the same SQL on a raw
#: connection (`main`). Tests are not scanned: they write old and corrupt registry files with raw SQL on purpose.
SQL_OUTSIDE_REGISTRY = {"bench/registry_bench.py:fill", "bench/registry_bench.py:main"}


def _code_strings(path: Path) -> Iterator[tuple[str, str]]:
    """(enclosing function, or `<module>`, text) of every string literal in a file that is not a docstring."""
    tree = _parse(path)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    owners = [("<module>", tree)] + list(_functions(tree))
    seen: set[int] = set()
    for owner, root in reversed(owners):  # innermost functions first: a string belongs to the nearest one
        for node in ast.walk(root):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings | seen:
                seen.add(id(node))
                yield owner, node.value


def test_registry_tables_are_named_in_sql_only_inside_registry():
    names = "|".join(sorted(_registry_relations()))
    sql = re.compile(rf"\b(FROM|JOIN|INTO|UPDATE|TABLE|VIEW)\s+[\"']?({names})\b", re.IGNORECASE)
    found = {
        f"{p.relative_to(ROOT)}:{owner}"
        for package in ("bench", "orchestration", "serving", "lora_assets")
        for p in sorted((ROOT / package).rglob("*.py"))
        for owner, text in _code_strings(p)
        if sql.search(text)
    }
    assert found == SQL_OUTSIDE_REGISTRY, (
        f"registry tables named in SQL outside registry/: {sorted(found)}; allowed: {sorted(SQL_OUTSIDE_REGISTRY)}. "
        "Fix: add a query to registry/store.py and call it"
    )
