"""The layering docs/architecture.md describes, checked on the source: which package may import which.

bench -> orchestration -> serving -> lora_assets -> registry: each package may import the ones to its right and
never one to its left, and only orchestration (and bench, tests) may import dagster.
"""

from __future__ import annotations

import ast
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


@pytest.mark.parametrize("package", ["serving", "lora_assets", "registry"])
def test_only_orchestration_imports_dagster(package):
    offenders = sorted(str(p.relative_to(ROOT)) for p in (ROOT / package).rglob("*.py") if "dagster" in _imports(p))
    assert not offenders, f"pure logic must not import dagster: {offenders}"
