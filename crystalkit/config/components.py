"""Typed parameters for registered components.

A component declares its parameters either as a nested pydantic ``Config`` class or simply as the
typed keyword arguments of its constructor/function; both become a strict pydantic model, so a
plugin author writes ordinary Python and still gets validated recipes and a JSON Schema. Keyword
arguments are described by the docstring's ``Args:`` section (or by ``Annotated[..., Field(...)]``).
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from crystalkit.config.params import arg_docs
from crystalkit.registry import Registry


@functools.cache
def config_model(obj: Any) -> type[BaseModel]:
    """The pydantic model validating ``obj``'s recipe parameters (everything but ``name``)."""
    declared = getattr(obj, "Config", None)
    if isinstance(declared, type) and issubclass(declared, BaseModel):
        return declared
    target = obj.__init__ if inspect.isclass(obj) else obj
    hints = typing.get_type_hints(target, include_extras=True)  # keep Annotated[..., Field(...)]
    docs = arg_docs(obj)
    fields: dict[str, Any] = {}
    extra = "forbid"
    for i, (pname, param) in enumerate(inspect.signature(target).parameters.items()):
        if inspect.isclass(obj) and i == 0:
            continue  # self
        if param.kind is param.VAR_KEYWORD:
            extra = "allow"
            continue
        if param.kind is param.VAR_POSITIONAL or pname.startswith("_"):
            continue
        default = ... if param.default is inspect.Parameter.empty else param.default
        described = {"description": docs[pname]} if pname in docs else {}
        fields[pname] = (hints.get(pname, Any), Field(default, **described))
    name = f"{getattr(obj, '__name__', 'Component')}Params"
    return create_model(name, __config__=ConfigDict(extra=extra), **fields)


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
