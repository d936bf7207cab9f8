"""The package's layering holds: no import cycle, and no module imports from a layer above its own.

Every ``import`` in every module counts, deferred ones inside functions included (a deferred
import still ties the two modules together). The layer order is the architecture map of
docs/index.md; the last test keeps that map and :data:`LAYERS` the same.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "crystalkit"

#: bottom to top: a module may import from its own layer and the layers below
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("errors", "io", "seeding", "device")),
    ("registries", ("registry", "params", "components", "provenance", "registries")),
    ("components", ("data", "models", "latents", "corruptions", "objectives")),
    ("recipes", ("config",)),
    ("method", ("crystal",)),
    ("runs", ("runs",)),
    ("evaluation", ("evaluation",)),
    ("training", ("training",)),
    ("tools", ("export", "ablation", "analysis")),
    ("interface", ("cli", "__main__", "testing")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The crystalkit modules ``path`` imports (``from pkg import mod`` names the module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.add(full if full in modules else target)
    return {m for m in found if m in modules and m != name}


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    for index, (_, members) in enumerate(LAYERS):
        if top in members:
            return index
    raise AssertionError(f"{module}: not in any layer of LAYERS (add its folder or file)")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def test_every_module_belongs_to_a_layer(graph):
    for module in graph:
        if module != "crystalkit":
            layer_of(module)


def test_no_module_imports_from_a_layer_above(graph):
    upward = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in graph.items()
        if module != "crystalkit"
        for target in sorted(targets)
        if target != "crystalkit" and layer_of(target) > layer_of(module)
    ]
    assert not upward, "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path that returns to its start), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_checks_catch_what_they_look_for():
    """The walker sees deferred imports, and the cycle search finds a cycle through them."""
    modules = {"crystalkit.a", "crystalkit.b", "crystalkit.c"}
    assert find_cycle({"crystalkit.a": {"crystalkit.b"}, "crystalkit.b": set()}) is None
    looped = {"crystalkit.a": {"crystalkit.b"}, "crystalkit.b": {"crystalkit.c"}}
    looped["crystalkit.c"] = {"crystalkit.a"}
    assert find_cycle(looped) == ["crystalkit.a", "crystalkit.b", "crystalkit.c", "crystalkit.a"]
    source = PACKAGE / "runs" / "load.py"
    assert "crystalkit.models.lora" in imports(source, {*modules, "crystalkit.models.lora"})
    assert layer_of("crystalkit.training.trainer") > layer_of("crystalkit.evaluation.accuracy")


def test_docs_architecture_map_lists_the_layers_in_order():
    """docs/index.md's map names every layer's folders and files, bottom to top, in this order."""
    text = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- layers -->\n```text\n(.*?)```", text, re.S)
    assert block is not None, "docs/index.md: no ```text block after <!-- layers -->"
    named = re.findall(r"^\s*\d+\s+\w+\s+(.+?)\s{2,}", block.group(1), re.M)
    documented = [
        tuple(n.strip().rstrip("/").removesuffix(".py") for n in row.split(",")) for row in named
    ]
    assert documented == [members for _, members in LAYERS]
