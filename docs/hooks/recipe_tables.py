"""MkDocs hook: recipe key tables generated from the code, so the docs never drift from it.

A page writes a marker on its own line and the hook replaces it with a Markdown table
(key, type, default, description) built from the pydantic models the recipe loader validates with:

    <!-- keys: top -->                    top-level keys (crystalkit.config.schema.Recipe)
    <!-- keys: latents -->                the ``latents:`` section (LatentsConfig)
    <!-- keys: crystal -->                the ``crystal:`` section (CrystalConfig)
    <!-- keys: train -->                  the ``train:`` section (TrainConfig)
    <!-- keys: eval -->                   the ``eval:`` section (EvalConfig)
    <!-- keys: lora -->                   the ``lora:`` section (LoraConfig)
    <!-- keys: warm_start -->             the ``warm_start:`` section (WarmStartConfig)
    <!-- keys: stage -->                  one entry of ``stages:`` (Stage)
    <!-- keys: stage_train -->            a stage's ``train:`` (StageTrain)
    <!-- keys: backbone:embedded -->      a registered component's parameters,
    <!-- keys: dataset:synthetic_shapes -->   via config_model(REGISTRY.get(name))

Component targets are ``KIND:NAME`` where KIND is a registry kind in singular or plural
(``backbone`` / ``backbones``, ``dataset``, ``corruption``, ``objective``, ``schedule``,
``weight``).
An unknown target, an unknown component or a malformed marker fails the build with a message
naming the page, the line and the marker. The ``top`` table links its sections to ``#backbone``,
``#dataset``, ``#train`` and ``#eval`` on the same page; mkdocs.yml's anchor validation makes a
missing heading fail ``mkdocs build --strict``.
"""

from __future__ import annotations

import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

try:
    import crystalkit  # noqa: F401
except ImportError:  # building from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

MARKER = re.compile(r"^[ \t]*<!--\s*keys:\s*(?P<target>[^\s>]+)\s*-->[ \t]*$", re.MULTILINE)
LOOSE_MARKER = re.compile(r"<!--\s*keys\b")


def _section_models() -> dict[str, type[BaseModel]]:
    from crystalkit.config.schema import (
        CrystalConfig,
        EvalConfig,
        LatentsConfig,
        LoraConfig,
        PromptConfig,
        Recipe,
        Stage,
        StageTrain,
        TrainConfig,
        WarmStartConfig,
    )

    return {
        "top": Recipe,
        "prompt": PromptConfig,
        "latents": LatentsConfig,
        "crystal": CrystalConfig,
        "train": TrainConfig,
        "eval": EvalConfig,
        "lora": LoraConfig,
        "warm_start": WarmStartConfig,
        "stage": Stage,
        "stage_train": StageTrain,
    }


def _registries() -> dict[str, Any]:
    from crystalkit.registries import ALL

    kinds: dict[str, Any] = {}
    for kind, registry in ALL.items():
        kinds[kind] = registry
        kinds[kind.removesuffix("s")] = registry
    return kinds


# -- rendering ---------------------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    """A compact, YAML-flavoured spelling of a field's type (``None`` is written ``null``)."""
    if annotation is type(None) or annotation is None:
        return "null"
    if annotation is Any:
        return "any"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_name(a) for a in args)}]" if args else name
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


def _bounds(field: FieldInfo) -> str:
    parts = []
    for meta in field.metadata:
        for cls, attr, symbol in _BOUNDS:
            if isinstance(meta, cls):
                parts.append(f"{symbol} {getattr(meta, attr)}")
    return ", ".join(parts)


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "*required*"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def _table(model: type[BaseModel], component: str | None = None) -> str:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    if component is not None:
        rows.append(
            f"| `name` | `str` | *required* | `{component}`, or an import path (see "
            "[how names resolve](registries.md#how-names-resolve)) |"
        )
    for key, field in model.model_fields.items():
        annotation = field.annotation
        type_text = _type_name(annotation)
        bounds = _bounds(field)
        if bounds:
            type_text = f"{type_text} ({bounds})"
        description = field.description or ""
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            # a nested section: its keys get their own table under a heading with this id
            if annotation.model_config.get("extra") == "allow":  # a component: name + params
                default = f"`name: {field.default_factory().name}`"  # type: ignore[misc]
            else:
                default = "—"
            description = f"{description}; keys: [`{key}:`](#{key})".lstrip("; ")
        elif model.__name__ == "Recipe" and key == "name":
            default = "*file stem*"  # the loader fills it in: load_recipe() setdefault("name", ...)
        else:
            default = _default(field)
        rows.append(
            # pipes inside code spans do not split table cells (Python-Markdown), so the type and
            # default cells stay unescaped; free text is escaped
            f"| `{key}` | `{type_text}` | {default} | {_cell(description)} |"
        )
    return "\n".join(rows)


def render(target: str) -> str:
    """The Markdown table for one marker target (raises ``KeyError``/``ValueError`` if unknown)."""
    sections = _section_models()
    if target in sections:
        return _table(sections[target])
    kind, sep, name = target.partition(":")
    if not sep or not name:
        raise ValueError(
            f"unknown target {target!r}; use one of {', '.join(sections)} or KIND:NAME "
            "(e.g. backbone:embedded)"
        )
    registries = _registries()
    if kind not in registries:
        valid = ", ".join(sorted(k for k in registries if not k.endswith("s")))
        raise ValueError(f"unknown registry kind {kind!r} in {target!r}; valid kinds: {valid}")
    from crystalkit.config.components import config_model

    registry = registries[kind]
    if name not in registry:
        raise ValueError(
            f"{target!r}: no {kind} named {name!r} is registered; registered: "
            f"{', '.join(registry.names()) or 'none'}"
        )
    return _table(config_model(registry.get(name)), component=name)


# -- mkdocs event ------------------------------------------------------------------------------


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    where = page.file.src_uri
    spans = [m.span() for m in MARKER.finditer(markdown)]
    for loose in LOOSE_MARKER.finditer(markdown):
        if not any(start <= loose.start() < end for start, end in spans):
            line = markdown.count("\n", 0, loose.start()) + 1
            raise PluginError(
                f"recipe_tables hook: {where}:{line}: malformed marker; write "
                "'<!-- keys: TARGET -->' alone on its line"
            )

    def replace(match: re.Match[str]) -> str:
        target = match.group("target")
        try:
            return render(target)
        except Exception as exc:
            line = markdown.count("\n", 0, match.start()) + 1
            raise PluginError(
                f"recipe_tables hook: {where}:{line}: marker '<!-- keys: {target} -->': {exc}"
            ) from exc

    return MARKER.sub(replace, markdown)
