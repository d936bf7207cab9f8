"""Which recipe keys name components, and in which registry: the one table the recipe loader, the
JSON Schema and the record of a run's components read.

A path part ``*`` stands for every key of a mapping (``objectives:``) or item of a list
(``train.loggers``). Adding a component key to the recipe means one row here (and its field in
:mod:`crystalkit.config.schema`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from crystalkit.config.schema import ComponentSpec, ObjectiveSpec
from crystalkit.registries import (
    BACKBONES,
    CORRUPTIONS,
    DATASETS,
    LOGGERS,
    OBJECTIVES,
    SCHEDULES,
    WEIGHTS,
)
from crystalkit.registry import Registry

Loc = tuple[str, ...]


@dataclass(frozen=True)
class ComponentKey:
    """A recipe key whose value names a component of ``registry``.

    Attributes:
        path: the key, ``*`` for every entry of a mapping or list.
        registry: where its ``name`` resolves.
        built_at_load: cheap: built (and its contract checked) while the recipe loads, so a check
            in its constructor fails with one line naming the key.
        training_only: only training builds it; a saved run evaluates without the plugin.
        per_stage: a stage (``stages:``) may set it.
        number: a plain number stands for it (a constant weight).
        named_by_key: its ``name`` defaults to its key (``objectives: {kl: {...}}``).
        shorthand: its name alone stands for it with default parameters (``[tensorboard]``).
        spec: the schema's type of the section: keys of its own besides the component's
            parameters (an objective's ``weight`` and ``gradient``).
    """

    path: Loc
    registry: Registry
    built_at_load: bool = False
    training_only: bool = False
    per_stage: bool = False
    number: bool = False
    named_by_key: bool = False
    shorthand: bool = False
    spec: type[ComponentSpec] = ComponentSpec

    @property
    def section(self) -> str:
        return self.path[0]


COMPONENT_KEYS: tuple[ComponentKey, ...] = (
    ComponentKey(("backbone",), BACKBONES),
    ComponentKey(("dataset",), DATASETS),
    ComponentKey(("latents", "schedule"), SCHEDULES, built_at_load=True, per_stage=True),
    ComponentKey(
        ("corruption",), CORRUPTIONS, built_at_load=True, training_only=True, per_stage=True
    ),
    ComponentKey(
        ("objectives", "*"),
        OBJECTIVES,
        built_at_load=True,
        training_only=True,
        per_stage=True,
        named_by_key=True,
        spec=ObjectiveSpec,
    ),
    ComponentKey(
        ("objectives", "*", "weight"),
        WEIGHTS,
        built_at_load=True,
        training_only=True,
        per_stage=True,
        number=True,
    ),
    ComponentKey(
        ("crystal", "ce_weight"),
        WEIGHTS,
        built_at_load=True,
        training_only=True,
        per_stage=True,
        number=True,
    ),
    ComponentKey(("train", "loggers", "*"), LOGGERS, training_only=True, shorthand=True),
)


def key_of(loc: Loc) -> ComponentKey | None:
    """The table row a concrete key (``("objectives", "kl")``) matches, if any."""
    for key in COMPONENT_KEYS:
        if len(key.path) == len(loc) and all(
            p in ("*", q) for p, q in zip(key.path, loc, strict=True)
        ):
            return key
    return None


def _entries(node: Any, part: str) -> list[tuple[Any, Any]]:
    if part != "*":
        value = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
        return [(part, value)]
    if isinstance(node, dict):
        return list(node.items())
    return list(enumerate(node)) if isinstance(node, list) else []


def locate(root: Any, path: Loc) -> Iterator[tuple[Loc, Any, Any]]:
    """``(concrete key, container, entry)`` of every value at ``path`` under ``root`` (a recipe, a
    stage or their sections; a mapping tree works too); absent values are skipped."""

    def walk(node: Any, rest: Loc, where: Loc) -> Iterator[tuple[Loc, Any, Any]]:
        for entry, value in _entries(node, rest[0]):
            if value is None:
                continue
            loc = (*where, str(entry))
            if len(rest) == 1:
                yield loc, node, entry
            else:
                yield from walk(value, rest[1:], loc)

    return walk(root, path, ())


def get_entry(container: Any, entry: Any) -> Any:
    return container[entry] if isinstance(container, dict | list) else getattr(container, entry)


def set_entry(container: Any, entry: Any, value: Any) -> None:
    if isinstance(container, dict | list):
        container[entry] = value
    else:
        setattr(container, entry, value)


def components(
    root: Any, keys: tuple[ComponentKey, ...] = COMPONENT_KEYS
) -> Iterator[tuple[Loc, ComponentKey, ComponentSpec]]:
    """``(concrete key, table row, spec)`` of every component ``root`` (a validated recipe or
    stage) names; a weight given as a number names none."""
    for key in keys:
        for loc, container, entry in locate(root, key.path):
            spec = get_entry(container, entry)
            if isinstance(spec, ComponentSpec):
                yield loc, key, spec


def component_name(loc: Loc, key: ComponentKey, spec: ComponentSpec) -> str:
    """``spec``'s name, or its key for a component named by its key."""
    return spec.name or (loc[-1] if key.named_by_key else "")
