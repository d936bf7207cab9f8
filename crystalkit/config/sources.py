"""Where each component of a run came from, recorded with the run.

A run may use components from plugin packages or ``file.py`` paths. Training writes
``RUN_DIR/components.json`` (recipe key -> kind, name, source), so that when a later command needs a
component this machine no longer has, its one-line error says what to install instead of only
"unknown corruption 'quantize'". Commands that do not need a component never look it up (see
:data:`~crystalkit.config.loader.TRAINING_ONLY`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crystalkit.config.schema import ComponentSpec, Recipe
from crystalkit.errors import UsageError
from crystalkit.registries import (
    BACKBONES,
    CORRUPTIONS,
    DATASETS,
    LOGGERS,
    OBJECTIVES,
    SCHEDULES,
    WEIGHTS,
)
from crystalkit.registry import Registry, source_text

SOURCES_FILE = "components.json"

Sources = dict[str, dict[str, str]]


def _components(recipe: Recipe) -> Iterator[tuple[str, Registry, str]]:
    """(recipe key, registry, name) of every component the recipe names, stages included."""
    yield "backbone", BACKBONES, recipe.backbone.name
    yield "dataset", DATASETS, recipe.dataset.name
    for i, logger in enumerate(recipe.train.loggers):
        yield f"train.loggers.{i}", LOGGERS, logger.name
    sections = [("", recipe)] + [(f"stages.{s.name}.", s) for s in recipe.stages]
    for prefix, section in sections:
        schedule = section.latents.schedule if section.latents else None
        if schedule is not None:
            yield f"{prefix}latents.schedule", SCHEDULES, schedule.name
        if section.corruption is not None:
            yield f"{prefix}corruption", CORRUPTIONS, section.corruption.name
        for key, spec in (section.objectives or {}).items():
            if spec is None:
                continue
            yield f"{prefix}objectives.{key}", OBJECTIVES, spec.name or key
            if isinstance(spec.weight, ComponentSpec):
                yield f"{prefix}objectives.{key}.weight", WEIGHTS, spec.weight.name
        if section.crystal is not None and isinstance(section.crystal.ce_weight, ComponentSpec):
            yield f"{prefix}crystal.ce_weight", WEIGHTS, section.crystal.ce_weight.name


def record_sources(recipe: Recipe) -> Sources:
    """Recipe key -> ``{kind, name, source}`` for every component (resolvable: the recipe was
    just validated)."""
    return {
        key: {"kind": registry.kind, "name": name, "source": source_text(registry.entry(name))}
        for key, registry, name in _components(recipe)
    }


def write_sources(run_dir: Path, recipe: Recipe) -> None:
    from crystalkit.io import atomic_write_json

    atomic_write_json(run_dir / SOURCES_FILE, record_sources(recipe))


def read_sources(run_dir: Path) -> Sources:
    """The recorded sources (empty for runs made before they were recorded, or unreadable)."""
    try:
        data = json.loads((run_dir / SOURCES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {  # a hand-edited file keeps its well-formed entries
        key: entry
        for key, entry in data.items()
        if isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())
    }


def install_hint(source: str) -> str:
    """What to do to get a component back, from its recorded source."""
    if source.startswith("plugin package "):
        dist, _, version = source.removeprefix("plugin package ").partition(" ")
        trained = f" (this run was trained with {version})" if version else ""
        return f"install the plugin package {dist}{trained}: pip install {dist}"
    if source.startswith("file "):
        return f"restore the file {source.removeprefix('file ')}"
    if source.startswith("module "):
        return f"make the module {source.removeprefix('module ')} importable"
    return "reinstall crystalkit"


def resolve_or_explain(registry: Registry, name: str, sources: Sources, where: str) -> Any:
    """``registry.get(name)``; if it fails, a :class:`UsageError` naming what to install (from
    the run's recorded ``sources``)."""
    try:
        return registry.get(name)
    except UsageError as exc:
        kind = registry.kind.removesuffix("s")
        recorded = next(
            (s["source"] for s in sources.values() if s.get("kind") == registry.kind
             and s.get("name") == name),
            None,
        )  # fmt: skip
        detail = f"; {install_hint(recorded)}" if recorded else f" ({exc})"
        raise UsageError(f"{where}: {kind} {name!r} is not available here{detail}") from None


def require(run_dir: Path, recipe_tree: dict[str, Any], sources: Sources) -> None:
    """Check that the components every command needs (backbone, dataset, latent schedules) are
    available, before the recipe is validated with them."""
    needed = {"backbone": BACKBONES, "dataset": DATASETS}
    for key, registry in needed.items():
        name = (recipe_tree.get(key) or {}).get("name")
        if isinstance(name, str):
            resolve_or_explain(registry, name, sources, f"{run_dir}: {key}")
    sections = [recipe_tree, *(recipe_tree.get("stages") or [])]
    for section in sections:
        schedule = ((section or {}).get("latents") or {}).get("schedule") or {}
        if isinstance(schedule.get("name"), str):
            resolve_or_explain(SCHEDULES, schedule["name"], sources, f"{run_dir}: latents")
