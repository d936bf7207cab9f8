"""A component's parameters: the strict model that validates them, and rows a person reads.

A component declares its parameters either as a nested pydantic ``Config`` class or simply as the
typed keyword arguments of its constructor/function; both become a strict pydantic model
(:func:`config_model`), so a plugin author writes ordinary Python and still gets validated recipes
and a JSON Schema. Keyword arguments are described by the docstring's ``Args:`` section (or by
``Annotated[..., Field(...)]``).

The same model is the one source for ``crystalkit list KIND NAME``, the key tables committed in
the docs and the JSON Schema (:func:`param_rows`), so a parameter is documented once, where Python
programmers look for it.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from crystalkit.registry import plain_text

_SECTION = re.compile(r"^(Args|Arguments|Parameters|Params):\s*$")
_ITEM = re.compile(r"^(?P<name>\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(?P<text>.*)$")


def arg_docs(obj: Any) -> dict[str, str]:
    """Parameter descriptions from the Google-style ``Args:`` sections of ``obj``'s docstring and,
    for a class, of its ``__init__``."""
    docs: dict[str, str] = {}
    targets = [obj, obj.__init__] if inspect.isclass(obj) else [obj]
    for target in targets:
        lines = (inspect.getdoc(target) or "").splitlines()
        inside, indent, current = False, None, None
        for line in lines:
            if _SECTION.match(line.strip()) and not line.startswith(" "):
                inside, indent, current = True, None, None
                continue
            if not inside:
                continue
            if not line.strip():
                current = None
                continue
            width = len(line) - len(line.lstrip())
            if width == 0:  # the section ended
                inside = False
                continue
            indent = width if indent is None else indent
            match = _ITEM.match(line.strip())
            if width == indent and match:
                current = match["name"].lstrip("*")
                docs[current] = match["text"].strip()
            elif current is not None:  # a continuation line
                docs[current] = f"{docs[current]} {line.strip()}".strip()
    return {name: plain_text(text) for name, text in docs.items()}


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


@dataclass(frozen=True)
class ParamRow:
    """One parameter, every cell as display text (``default`` is JSON, or ``required``)."""

    key: str
    type: str
    default: str
    constraint: str
    description: str
    section: bool = False  # a nested mapping with keys of its own
    component: bool = False  # a nested component section (name + parameters)


def type_name(annotation: Any) -> str:
    """A compact, YAML-flavoured spelling of a type (``None`` is written ``null``)."""
    if annotation is type(None) or annotation is None:
        return "null"
    if annotation is Any:
        return "any"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "component" if annotation.model_config.get("extra") == "allow" else "mapping"
        return annotation.__name__
    return str(annotation).replace("typing.", "")


_BOUNDS = (
    (annotated_types.Ge, "ge", "≥"),
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Le, "le", "≤"),
    (annotated_types.Lt, "lt", "<"),
)


def constraint(field: FieldInfo) -> str:
    """Bounds declared on the field (``≥ 0, < 1``); checks in the constructor are not visible."""
    parts = []
    for meta in field.metadata:
        for cls, attr, symbol in _BOUNDS:
            if isinstance(meta, cls):
                parts.append(f"{symbol} {getattr(meta, attr)}")
    return ", ".join(parts)


def default_text(field: FieldInfo) -> str:
    """The default as JSON (what a recipe would write), or ``required``."""
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value, ensure_ascii=False)


def param_rows(model: type[BaseModel]) -> list[ParamRow]:
    """The rows of ``model``'s fields, in declaration order."""
    rows = []
    for key, field in model.model_fields.items():
        annotation = field.annotation
        nested = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        component = nested and annotation.model_config.get("extra") == "allow"
        if component:
            default = f"name: {field.get_default(call_default_factory=True).name}"
        elif nested:
            default = "—"
        else:
            default = default_text(field)
        rows.append(
            ParamRow(
                key,
                type_name(annotation),
                default,
                constraint(field),
                plain_text(field.description or ""),
                section=nested,
                component=component,
            )
        )
    return rows
