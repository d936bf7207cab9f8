"""The docs' generated blocks (key tables, lists of built-ins) match the code, and every built-in
component has its key table somewhere in the docs. ``mkdocs build`` checks staleness too (the hook
in docs/hooks/generated.py); this test fails earlier, with the command that fixes it."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from crystalkit.registries import ALL

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def generated():
    spec = importlib.util.spec_from_file_location("docs_generated", DOCS / "hooks" / "generated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_generated_block_is_current(generated):
    stale = []
    for page in sorted(DOCS.glob("*.md")):
        _, found = generated.regenerate(page.read_text(encoding="utf-8"), page.name)
        stale += found
    assert not stale, f"{stale}; run `python docs/hooks/generated.py`"


def test_a_stale_or_unknown_block_is_reported_with_its_line(generated):
    page = "intro\n<!-- generated: keys corruption:blur -->\n| old |\n<!-- end generated -->\n"
    fixed, stale = generated.regenerate(page, "p.md")
    assert stale == ["p.md:2: 'keys corruption:blur' is stale"]
    assert "`radius`" in fixed and generated.regenerate(fixed, "p.md")[1] == []
    with pytest.raises(ValueError, match=r"p\.md:1: no built-in corruption named 'blurr'"):
        generated.regenerate(
            "<!-- generated: keys corruption:blurr -->\n<!-- end generated -->\n", "p.md"
        )
    with pytest.raises(ValueError, match=r"p\.md:2: malformed block"):
        generated.regenerate("x\n<!-- generated: registries -->\n", "p.md")


def test_every_builtin_component_has_its_key_table():
    """A table per built-in, or one for a family sharing its parameters (the HF backbones)."""
    from crystalkit.params import config_model

    text = "\n".join(page.read_text(encoding="utf-8") for page in DOCS.glob("*.md"))
    documented = set(re.findall(r"<!-- generated: keys (\w+):(\w+) -->", text))
    for kind, registry in ALL.items():
        tables = {config_model(registry.get(n)) for k, n in documented if f"{k}s" == kind}
        for entry in registry.entries():
            if entry.source == "builtin":
                assert config_model(entry.obj) in tables, (kind, entry.name)


def test_schema_alternatives_carry_parameter_descriptions():
    from crystalkit.config.json_schema import recipe_json_schema

    schema = recipe_json_schema()
    blur = next(a for a in schema["properties"]["corruption"]["anyOf"] if a.get("title") == "blur")
    assert "standard deviation" in blur["properties"]["radius"]["description"]
