"""Load a recipe: YAML -> ``inherit`` chain -> CLI overrides -> typed, validated :class:`Recipe`.

Every failure is a :class:`RecipeError` with one line that names the file the offending value came
from, its dotted key, the bad value and what was expected.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from crystalkit.components import ParamsError, validate_params
from crystalkit.config.contracts import CHECK_IMAGE_SIDE, build_and_check
from crystalkit.config.keys import (
    COMPONENT_KEYS,
    ComponentKey,
    Loc,
    get_entry,
    key_of,
    locate,
    set_entry,
)
from crystalkit.config.names import anchor_name, anchor_names
from crystalkit.config.overrides import apply_override, parse_override
from crystalkit.config.schema import (
    STAGE_SECTIONS,
    ComponentSpec,
    Recipe,
    StageLatents,
    StageTrain,
)
from crystalkit.errors import RecipeError, UsageError, did_you_mean
from crystalkit.io import read_yaml

Path_ = Loc


def _switches_component(path: Path_, old: Any, new: Any) -> bool:
    """Whether ``new`` (a mapping set at ``path``) names a different component than ``old``: its
    parameters then start from the new component's defaults, not from the old one's values."""
    key = key_of(path)
    if key is None or not isinstance(old, dict) or "name" not in new:
        return False
    current = old.get("name")
    if current is None:  # the section keeps its default component (an objective: its key)
        current = _default_name(key, path)
    return current != new["name"]


def _merge(
    base: dict, child: dict, prov: dict[Path_, str], source: str, prefix: Path_ = ()
) -> dict:
    """Deep-merge ``child`` over ``base`` (mappings merge, everything else replaces; a component
    section whose ``name`` changes is replaced whole)."""
    out = dict(base)
    for key, value in child.items():
        path = (*prefix, str(key))
        if isinstance(value, dict) and _switches_component(path, out.get(key), value):
            for stale in [p for p in prov if p[: len(path)] == path]:
                del prov[stale]
            out[key] = copy.deepcopy(value)
            _mark(prov, path, value, source)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, prov, source, path)
        else:
            out[key] = copy.deepcopy(value)
            _mark(prov, path, value, source)
    return out


def _mark(prov: dict[Path_, str], path: Path_, value: Any, source: str) -> None:
    prov[path] = source
    if isinstance(value, dict):
        for key, sub in value.items():
            _mark(prov, (*path, str(key)), sub, source)


def _load_tree(path: Path, prov: dict[Path_, str], chain: tuple[Path, ...] = ()) -> dict:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise RecipeError(f"{path}: inherit cycle: {cycle}")
    data = read_yaml(path, RecipeError)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    data = anchor_names(data, path.parent)
    parents = data.pop("inherit", None) or []
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise RecipeError(
            f"{path}: inherit: expected a file path or a list of them, got {parents!r}"
        )
    tree: dict = {}
    for parent in parents:
        parent_path = path.parent / parent
        if not parent_path.is_file():
            raise RecipeError(
                f"{path}: inherit: {parent!r} not found (looked for {parent_path}; paths are "
                "relative to the recipe file)"
            )
        tree = _merge(
            tree, _load_tree(parent_path, prov, (*chain, resolved)), prov, str(parent_path)
        )
    return _merge(tree, data, prov, str(path))


def load_recipe(
    path: str | Path,
    overrides: Sequence[str] = (),
    anchor: Path | None = None,
    training: bool = True,
) -> Recipe:
    """Read, merge, override and validate a recipe file.

    A relative ``file.py:attr`` name resolves against the folder of the file that names it;
    in ``overrides``, against ``anchor`` (default: the working directory; a grid passes its own
    folder). The resolved recipe holds such names absolute, so a run's saved recipe works from
    anywhere. A mapping override merges into the mapping it is set over, like ``inherit``.
    ``training=False``: components only training uses are not looked up (:func:`validate_recipe`).
    """
    path = Path(path)
    prov: dict[Path_, str] = {}
    tree = _load_tree(path, prov)
    if prov.get(("name",)) != str(path):  # a run is named by its own file, never by a base
        tree["name"] = path.stem
    for text in overrides:
        override = parse_override(text)
        source = f"override {text!r}"
        value = override.value
        if override.path[-1] == "name" and isinstance(value, str):
            value = anchor_name(value, anchor or Path.cwd())
        override = replace(override, value=anchor_names(value, anchor or Path.cwd()))
        section = override.path[:-1]
        if override.path[-1] == "name" and _switches_component(
            section, _get(tree, section), {"name": override.value}
        ):
            _set_section(tree, section, {})  # another component: drop the old one's parameters
            for stale in [p for p in prov if p[: len(section)] == section]:
                del prov[stale]
        merged = False

        def merge(old: dict, new: dict, override=override, source=source) -> dict:
            nonlocal merged
            if old and not new:
                raise RecipeError(
                    f"{source}: an empty mapping merges nothing into {override.key}; write "
                    f"'~{override.key}' to reset it to its default (to replace it whole: "
                    f"'~{override.key}' then '{override.key}={{...}}')"
                )
            merged = True
            last, parent = override.path[-1], override.path[:-1]
            return _merge({last: old}, {last: new}, prov, source, parent)[last]

        apply_override(tree, override, merge)
        if not merged:
            _mark(prov, override.path, override.value, source)
    return validate_recipe(tree, source=str(path), provenance=prov, training=training)


def _default_name(key: ComponentKey, loc: Path_) -> str | None:
    """The component a section names when it gives no ``name``: its key for an objective, the
    schema's default for a fixed section, none for a list item or a weight."""
    if key.named_by_key:
        return loc[-1]
    if "*" in key.path or key.number:
        return None
    model: Any = Recipe
    for part in key.path[:-1]:
        model = model.model_fields[part].annotation
    return model.model_fields[key.path[-1]].get_default(call_default_factory=True).name


def _set_section(tree: dict, loc: Path_, value: dict) -> None:
    for part in loc[:-1]:
        tree = tree[part]
    tree[loc[-1]] = value


def _get(tree: Any, loc: Path_) -> Any:
    for part in loc:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(part)
    return tree


def validate_recipe(
    tree: dict[str, Any],
    source: str = "<recipe>",
    provenance: dict[Path_, str] | None = None,
    training: bool = True,
) -> Recipe:
    """Validate a merged recipe tree; component parameters are checked against their registry.
    Each stage is merged over the recipe's own sections, validated like a recipe of its own
    (errors name ``stages.NAME.KEY``) and stored fully resolved. ``training=False``: the
    components only training uses (:class:`~crystalkit.config.keys.ComponentKey`) are kept as
    written, not looked up: a run evaluates without the plugins only its training used."""
    provenance = provenance or {}
    stages = tree.get("stages")
    if not isinstance(stages, list) or not stages:
        return _validate(tree, source, provenance, training=training)
    top = {key: value for key, value in tree.items() if key != "stages"}
    base = _validate(copy.deepcopy(top), source, provenance, training=training)  # its own first
    where = _source_of(("stages",), provenance, source)
    resolved = [
        _resolve_stage(top, stage, i, base, where, provenance, training)
        for i, stage in enumerate(stages)
    ]
    return _validate({**tree, "stages": resolved}, source, provenance, training=training)


def _resolve_stage(
    top: dict[str, Any],
    stage: Any,
    index: int,
    base: Recipe,
    source: str,
    prov: dict[Path_, str],
    training: bool = True,
) -> dict[str, Any]:
    """A stage with every section filled: its own keys merged over the recipe's."""
    if not isinstance(stage, dict):
        raise RecipeError(
            f"{source}: stages.{index}: expected a mapping (name, fraction and the recipe "
            f"sections the stage changes), got {stage!r}"
        )
    label = f"stages.{stage.get('name', index)}"
    allowed = {"name": None, "fraction": None} | dict.fromkeys(STAGE_SECTIONS)
    for key in stage:
        if key not in allowed:
            raise RecipeError(
                f"{source}: {label}.{key}: not a stage key{did_you_mean(str(key), allowed)}; a "
                f"stage sets {', '.join(STAGE_SECTIONS)} (besides name and fraction); the other "
                "keys belong to the whole run"
            )
    for section, model in (("train", StageTrain), ("latents", StageLatents)):
        keys = stage.get(section)
        for key in keys if isinstance(keys, dict) else ():
            if key not in model.model_fields:
                raise RecipeError(
                    f"{source}: {label}.{section}.{key}: not a per-stage key"
                    f"{did_you_mean(str(key), model.model_fields)}; a stage sets {section}."
                    f"{{{', '.join(model.model_fields)}}} (a stage's length is its fraction of "
                    "train.steps; the other keys belong to the whole run)"
                )
    overlay = {key: stage[key] for key in STAGE_SECTIONS if key in stage}
    merged = _merge(copy.deepcopy(top), copy.deepcopy(overlay), dict(prov), source)
    if isinstance(merged.get("objectives"), dict):
        merged["objectives"] = {k: v for k, v in merged["objectives"].items() if v is not None}
    own = _validate(merged, source, {}, label=tuple(label.split(".")), training=training)
    own = own.to_dict()
    return {
        "name": stage.get("name"),
        "fraction": stage.get("fraction"),
        "method": own["method"],
        "latents": {key: own["latents"][key] for key in StageLatents.model_fields},
        "corruption": own["corruption"],
        "crystal": own["crystal"],
        "objectives": own["objectives"]
        | {k: None for k in base.objectives if k not in own["objectives"]},
        "train": {key: own["train"][key] for key in StageTrain.model_fields},
    }


def _validate(
    tree: dict[str, Any],
    source: str,
    provenance: dict[Path_, str],
    label: Path_ = (),
    training: bool = True,
) -> Recipe:
    for key in COMPONENT_KEYS:  # a section without a name keeps its default component
        for loc, container, entry in locate(tree, key.path):
            section = get_entry(container, entry)
            if isinstance(section, dict) and section.get("name") is None:
                default = _default_name(key, loc)
                if default is not None:
                    section["name"] = default
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as exc:
        raise RecipeError(
            format_validation_error(exc, Recipe, source, provenance, prefix=label)
        ) from None
    side = recipe.dataset.params.get("image_size")  # corruptions see the dataset's images
    side = side if isinstance(side, int) and not isinstance(side, bool) and side > 0 else None
    for key in COMPONENT_KEYS:  # in table order: an objective before its weight
        if key.training_only and not training:
            continue
        for loc, container, entry in list(locate(recipe, key.path)):
            spec = get_entry(container, entry)
            if isinstance(spec, ComponentSpec):
                resolved = _resolve_component(
                    spec, key, loc, source, provenance, label, side or CHECK_IMAGE_SIDE
                )
                set_entry(container, entry, resolved)
    return recipe


def _resolve_component(
    spec: ComponentSpec,
    key: ComponentKey,
    loc: Path_,
    source: str,
    prov: dict[Path_, str],
    label: Path_ = (),
    image_side: int = CHECK_IMAGE_SIDE,
) -> ComponentSpec:
    """``spec`` with its parameters validated (and, for a component built at load, built and
    contract-checked), stored with every default filled in."""
    named = (*loc, "name")
    where = _source_of(named if named in prov else loc, prov, source)  # objectives: name = key
    dotted = ".".join((*label, *loc))
    try:
        params = validate_params(key.registry, spec.name, spec.params)
    except ParamsError as exc:
        raise RecipeError(
            format_validation_error(exc.error, exc.model, source, prov, prefix=(*label, *loc))
        ) from None
    except UsageError as exc:  # an unknown name
        raise RecipeError(f"{where}: {dotted}.name: {exc}") from None
    if key.built_at_load:
        at = f"{_source_of(loc, prov, source)}: {dotted}"
        build_and_check(key.registry, spec.name, params, at, image_side)
    declared = spec.model_dump(include=set(type(spec).model_fields))
    return type(spec)(**declared | params.model_dump(mode="json"))


def format_validation_error(
    exc: ValidationError,
    model: type[BaseModel],
    source: str,
    prov: dict[Path_, str],
    prefix: Path_ = (),
) -> str:
    err = exc.errors(include_url=False)[0]
    loc = (*prefix, *(str(p) for p in err["loc"]))
    key = ".".join(loc)
    where = _source_of(loc, prov, source)
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if err["type"] == "extra_forbidden":
        valid = _field_names(model, err["loc"][:-1])
        hint = did_you_mean(loc[-1], valid)
        return f"{where}: {key}: unknown key{hint}; valid keys here: {', '.join(valid)}{more}"
    if err["type"] == "missing":
        return f"{where}: {key}: required key is missing{more}"
    message = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    got = "" if "got" in message or not err["loc"] else f", got {err['input']!r}"
    return f"{where}: {key + ': ' if key else ''}{message}{got}{more}"


def _source_of(loc: Path_, prov: dict[Path_, str], default: str) -> str:
    """Which files or overrides set the value at ``loc`` (a section may be assembled from
    several), else the closest enclosing key's source."""
    below = [p for p in prov if p[: len(loc)] == loc]
    if below:  # the key itself, or an unknown section whose subkeys were set somewhere
        return " + ".join(dict.fromkeys(prov[p] for p in sorted(below, key=len)))
    return next((prov[loc[:i]] for i in range(len(loc) - 1, 0, -1) if loc[:i] in prov), default)


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (sub)model at ``loc`` inside ``model``, for did-you-mean hints."""
    current: Any = model
    for part in loc:
        field = current.model_fields.get(part) if hasattr(current, "model_fields") else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        current = annotation
    return sorted(current.model_fields)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (what runs write next to their outputs)."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
