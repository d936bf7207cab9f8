"""The JSON Schema of recipes (``crystalkit recipe schema``), for editors' completion and checks.

The typed sections come from :class:`~crystalkit.config.schema.Recipe`; every key of
:data:`~crystalkit.config.keys.COMPONENT_KEYS` becomes one alternative per registered component
(its parameters from :func:`~crystalkit.params.config_model`) plus a generic import path.
"""

from __future__ import annotations

from typing import Any

from crystalkit.config.keys import COMPONENT_KEYS, ComponentKey
from crystalkit.config.schema import Recipe
from crystalkit.params import config_model
from crystalkit.registry import Registry


def component_schema(registry: Registry) -> dict[str, Any]:
    """JSON Schema for a component section: one alternative per registered name, keyed by ``name``."""
    alternatives = []
    for entry in registry.entries():
        schema = config_model(entry.obj).model_json_schema()
        schema.setdefault("properties", {})
        schema["properties"] = {"name": {"const": entry.name, "description": entry.description}} | (
            schema["properties"]
        )
        schema["required"] = ["name", *schema.get("required", [])]
        schema["title"] = entry.name
        alternatives.append(schema)
    generic = {
        "type": "object",
        "title": "import path",
        "properties": {"name": {"type": "string", "pattern": ".+:.+"}},
        "required": ["name"],
        "description": "a component named as package.module:attr or path/to/file.py:attr",
    }
    return {"anyOf": [*alternatives, generic]}


def recipe_json_schema() -> dict[str, Any]:
    """JSON Schema of recipes, with one alternative per registered component (for editors)."""
    schema = Recipe.model_json_schema()
    defs = schema.setdefault("$defs", {})
    for key in COMPONENT_KEYS:
        if _parent(key) is not None:
            continue  # inside another component's section: filled in with that section
        owner, slot = _slot(schema, defs, key.path)
        owner[slot] = _key_schema(key, defs, owner[slot].get("description", ""))
    schema["required"] = [key for key in schema.get("required", []) if key != "name"]
    schema["properties"]["inherit"] = {
        "description": "base recipe(s), relative to this file",
        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
    }
    return schema


def _parent(key: ComponentKey) -> ComponentKey | None:
    """The component key whose section holds ``key`` (an objective's weight), if any."""
    return next((k for k in COMPONENT_KEYS if k.path == key.path[:-1]), None)


def _key_schema(key: ComponentKey, defs: dict[str, Any], description: str) -> dict[str, Any]:
    """The alternatives a component key accepts: each registered component, an import path, and
    a number or a bare name where the key takes one."""
    alternatives = component_schema(key.registry)["anyOf"]
    own = key.spec.model_json_schema()
    defs.update(own.pop("$defs", {}))
    extra = {field: prop for field, prop in own.get("properties", {}).items() if field != "name"}
    inner = {k.path[-1]: k for k in COMPONENT_KEYS if _parent(k) is key}
    for alternative in alternatives:
        defs.update(alternative.pop("$defs", {}))
        for field, prop in extra.items():
            alternative["properties"][field] = (
                _key_schema(inner[field], defs, prop.get("description", ""))
                if field in inner
                else prop
            )
        if key.named_by_key:
            alternative["required"] = [r for r in alternative["required"] if r != "name"]
    if key.number:
        alternatives = [{"type": "number", "minimum": 0}, *alternatives]
    if key.shorthand:
        alternatives = [{"type": "string", "enum": key.registry.names()}, *alternatives]
    return {"description": description, "anyOf": alternatives}


def _slot(schema: dict[str, Any], defs: dict[str, Any], path: tuple[str, ...]) -> tuple[dict, str]:
    """The schema node holding ``path``'s value, and the key of the value in it."""
    node: dict[str, Any] = schema
    owner, slot = schema, ""
    for part in path:
        node = _deref(node, defs)
        if part == "*":
            owner, slot = (
                node,
                "additionalProperties" if "additionalProperties" in node else "items",
            )
        else:
            owner, slot = node["properties"], part
        node = owner[slot]
    return owner, slot


def _deref(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    return defs[ref.rsplit("/", 1)[-1]] if ref else node
