"""Where each component of a run came from, recorded with the run.

A run may use components from plugin packages or ``file.py`` paths. Training records them
(recipe key -> kind, name, source; :mod:`crystalkit.runs.sources` keeps the record in
``RUN_DIR/components.json``), so that when a later command needs a
component this machine no longer has, its one-line error says what to install instead of only
"unknown corruption 'quantize'". Commands that do not need a component never look it up (see
:class:`~crystalkit.config.keys.ComponentKey`'s ``training_only``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crystalkit.config.keys import COMPONENT_KEYS, component_name, components, get_entry, locate
from crystalkit.config.schema import Recipe
from crystalkit.errors import UsageError
from crystalkit.provenance import code_record, install_hint
from crystalkit.registry import Registry

Sources = dict[str, dict[str, str]]
_PER_STAGE = tuple(key for key in COMPONENT_KEYS if key.per_stage)


def _components(recipe: Recipe) -> Iterator[tuple[str, Registry, str]]:
    """(recipe key, registry, name) of every component the recipe names, stages included."""
    sections = [("", recipe, COMPONENT_KEYS)]
    sections += [(f"stages.{s.name}.", s, _PER_STAGE) for s in recipe.stages]
    for prefix, section, keys in sections:
        for loc, key, spec in components(section, keys):
            yield prefix + ".".join(loc), key.registry, component_name(loc, key, spec)


def record_sources(recipe: Recipe) -> Sources:
    """Recipe key -> ``{kind, name, source, version, origin?, code?}`` for every component
    (resolvable: the recipe was just validated; see :func:`~crystalkit.provenance.code_record`)."""
    return {
        key: {"kind": registry.kind, "name": name, **code_record(registry.entry(name))}
        for key, registry, name in _components(recipe)
    }


def recorded_entry(sources: Sources, registry: Registry, name: str) -> dict[str, str] | None:
    """The run's record of ``registry``'s component ``name``, if it has one."""
    return next(
        (s for s in sources.values() if s.get("kind") == registry.kind and s.get("name") == name),
        None,
    )


def resolve_or_explain(registry: Registry, name: str, sources: Sources, where: str) -> Any:
    """``registry.get(name)``; if it fails, a :class:`UsageError` naming what to install (from
    the run's recorded ``sources``)."""
    try:
        return registry.get(name)
    except UsageError as exc:
        if registry.import_failure(name) or registry.clash(name):
            raise UsageError(f"{where}: {exc}") from None
        recorded = recorded_entry(sources, registry, name)
        detail = f"; {install_hint(recorded)}" if recorded else f" ({exc})"
        raise UsageError(
            f"{where}: {registry.singular} {name!r} is not available here{detail}"
        ) from None


def require(run_dir: Path, recipe_tree: dict[str, Any], sources: Sources) -> None:
    """Check that the components every command needs (those not only training uses: backbone,
    dataset, latent schedules) are available, before the recipe is validated with them."""
    needed = [key for key in COMPONENT_KEYS if not key.training_only]
    for section in [recipe_tree, *(recipe_tree.get("stages") or [])]:
        for key in needed if isinstance(section, dict) else ():
            for loc, container, entry in locate(section, key.path):
                value = get_entry(container, entry)
                name = value.get("name") if isinstance(value, dict) else None
                if isinstance(name, str):
                    where = f"{run_dir}: {'.'.join(loc)}"
                    resolve_or_explain(key.registry, name, sources, where)
