"""Grid files and their expansion into cells.

A grid file names a base recipe and the keys to vary::

    base: ../recipes/crystal_scratch.yaml
    overrides: [train.steps=300]            # every cell
    grid:                                   # cartesian product, in file order
      corruption.name: [none, blur, mask]
    zip:                                    # keys varied together (equal-length lists)
      - {latents.family: [token, recurrent], latents.schedule.k: [8, 4]}
    variants:                               # named arms: an axis "variant" of override lists
      finetune: [method=finetune, latents.schedule.k=0]
      crystal: []
    seeds: [0, 1, 2]
    seed_keys: [seed, dataset.seed]         # keys set to each cell's seed (default: [seed])
    exclude: [{corruption.name: none, latents.family: recurrent}]
    cells: [{match: {corruption.name: mask}, overrides: [corruption.fraction=0.75]}]
    warm_start: {base: ../recipes/direct_finetune.yaml, overrides: [train.steps=600]}
    metric: {name: accuracy, mode: max}
    compare: {variant: finetune}            # report paired differences to this row, per seed

Expansion is local and deterministic. A cell's id is a hash of its resolved overrides (order of
keys and of grid lists does not matter), so re-running the same grid finds the same run folders.
With ``warm_start``, one source run per seed is trained first (its own recipe), and every cell of
that seed starts from it (``warm_start.source``; a variant or ``cells`` entry can set
``warm_start.source=null`` to start from scratch instead).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from crystalkit.config.loader import format_validation_error, load_recipe
from crystalkit.config.overrides import parse_override
from crystalkit.config.schema import Recipe
from crystalkit.errors import RecipeError, UsageError
from crystalkit.io import read_yaml


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MetricSpec(_Strict):
    name: str = Field(
        "accuracy",
        description="results.json key ranked on (per_category.X and per_bucket.X allowed)",
    )
    mode: Literal["max", "min"] = Field("max", description="whether higher or lower is better")


class CellOverrides(_Strict):
    match: dict[str, Any] = Field(description="partial assignment of grid keys")
    overrides: list[str] = Field(description="extra overrides for the matching cells")


class WarmStartSource(_Strict):
    base: str = Field(description="recipe of the source run, relative to the grid file")
    overrides: list[str] = Field(default_factory=list, description="overrides of the source run")


#: the axis a grid's ``variants:`` add
VARIANT = "variant"
#: most cells one grid may expand to (before ``exclude``)
MAX_CELLS = 10_000


class GridFile(_Strict):
    """A grid file (see the module docstring)."""

    base: str = Field(description="recipe path, relative to the grid file")
    description: str = ""
    overrides: list[str] = Field(default_factory=list, description="overrides for every cell")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="key -> values")
    zip: list[dict[str, list[Any]]] = Field(
        default_factory=list, description="groups of keys whose value lists are zipped"
    )
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    seed_keys: list[str] = Field(
        default_factory=lambda: ["seed"],
        min_length=1,
        description="recipe keys each cell sets to its seed; [seed, dataset.seed] also draws the "
        "dataset (its scenes, so its test items) anew per seed, so that intervals over seeds "
        "include item-sampling noise",
    )
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    variants: dict[str, list[str]] = Field(
        default_factory=dict, description="named arms: variant name -> its overrides"
    )
    cells: list[CellOverrides] = Field(default_factory=list)
    warm_start: WarmStartSource | None = Field(
        None, description="a source run per seed that every cell of that seed starts from"
    )
    metric: MetricSpec = Field(default_factory=MetricSpec)
    compare: dict[str, Any] | None = Field(
        None, description="the row (partial assignment) the report pairs every row with, by seed"
    )
    collapse_below: float | None = Field(
        None, description="count the seeds whose metric ends below this value (collapsed runs)"
    )
    output_dir: str | None = Field(None, description="default: runs/ablations/<grid file stem>")
    slurm: dict[str, Any] = Field(
        default_factory=dict, description="submitit executor parameters for --launcher submitit"
    )

    @field_validator("grid")
    @classmethod
    def _non_empty_lists(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"{key}: needs at least one value")
        return grid

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
        if repeated:  # two cells would share one run directory
            raise ValueError(f"each seed once; {repeated[0]} repeats")
        return seeds

    @field_validator("seed_keys")
    @classmethod
    def _distinct_keys(cls, keys: list[str]) -> list[str]:
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise ValueError(f"each key once; {repeated[0]} repeats")
        return keys

    def seeded(self, seed: int) -> tuple[str, ...]:
        """The overrides that give a cell its seed."""
        return tuple(f"{key}={seed}" for key in self.seed_keys)

    @field_validator("zip")
    @classmethod
    def _equal_lengths(cls, groups: list[dict[str, list[Any]]]) -> list[dict[str, list[Any]]]:
        for i, group in enumerate(groups):
            lengths = {key: len(values) for key, values in group.items()}
            if not group or len(set(lengths.values())) != 1 or 0 in lengths.values():
                raise ValueError(
                    f"group {i}: needs keys with equal, non-zero numbers of values, got {lengths}"
                )
        return groups

    @model_validator(mode="after")
    def _keys_once(self) -> GridFile:
        keys = [*self.grid, *(k for group in self.zip for k in group)]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise ValueError(f"keys varied twice (grid and zip): {', '.join(repeated)}")
        if VARIANT in keys:
            raise ValueError(f"{VARIANT!r} is the axis of variants:, not a key to vary")
        seeded = sorted(set(keys) & set(self.seed_keys))
        if seeded:
            raise ValueError(f"seed_keys: {', '.join(seeded)} is varied too; set it one way")
        if self.variants:
            keys.append(VARIANT)
        entries = [
            *(("exclude", e) for e in self.exclude),
            *(("cells", c.match) for c in self.cells),
            ("compare", self.compare or {}),
        ]
        for field, entry in entries:
            unknown = sorted(set(entry) - set(keys))
            if unknown:
                raise ValueError(
                    f"{field} names keys the grid does not vary: {', '.join(unknown)}"
                    + (" (the variants' axis is 'variant')" if self.variants else "")
                )
        values = {VARIANT: list(self.variants), **self.grid}
        values |= {k: v for group in self.zip for k, v in group.items()}
        for key, value in (self.compare or {}).items():
            if value not in values[key]:
                raise ValueError(
                    f"compare: {key}={value!r} is not one of the grid's values "
                    f"({', '.join(map(str, values[key]))})"
                )
        return self

    @model_validator(mode="after")
    def _bounded(self) -> GridFile:
        """A grid is expanded (and every cell's recipe validated) up front: a product of a few
        long lists must fail at once, not after minutes of expansion."""
        lengths = [
            *(len(values) for values in self.grid.values()),
            *(len(next(iter(group.values()))) for group in self.zip),
            len(self.variants) or 1,
            len(self.seeds),
        ]
        total = math.prod(lengths)
        if total > MAX_CELLS:
            raise ValueError(
                f"the grid expands to {total:,} cells (axes x seeds: "
                f"{' x '.join(map(str, lengths))}); at most {MAX_CELLS:,}"
            )
        return self


@dataclass(frozen=True)
class Cell:
    """One run of a grid: the varied values, the seed, and the overrides that make its recipe.
    ``base`` is set for a warm-start source, which runs its own recipe."""

    assignment: tuple[tuple[str, Any], ...]
    seed: int
    overrides: tuple[str, ...]
    base: str | None = None

    @property
    def id(self) -> str:
        if self.base is None:
            return cell_id(self.overrides)
        return "source-" + cell_id((*self.overrides, override_text("base", self.base)))

    @property
    def values(self) -> dict[str, Any]:
        return dict(self.assignment)

    def label(self) -> str:
        if self.base is not None:
            return "warm-start source"
        return ", ".join(f"{k}={compact(v)}" for k, v in self.assignment) or "(base)"


@dataclass
class Grid:
    path: Path
    spec: GridFile

    @property
    def base(self) -> Path:
        return (self.path.parent / self.spec.base).resolve()

    @property
    def output_dir(self) -> Path:
        if self.spec.output_dir is not None:  # "grids/../out" printed as "out"
            return Path(os.path.normpath(self.path.parent / self.spec.output_dir))
        return Path("runs") / "ablations" / self.path.stem

    @property
    def varied_keys(self) -> list[str]:
        keys = [*self.spec.grid, *(k for group in self.spec.zip for k in group)]
        return [*keys, VARIANT] if self.spec.variants else keys

    def sources(self) -> list[Cell]:
        """The warm-start source run of each seed (none without ``warm_start``)."""
        source = self.spec.warm_start
        if source is None:
            return []
        return [
            Cell((), seed, (*source.overrides, *self.spec.seeded(seed)), base=source.base)
            for seed in self.spec.seeds
        ]

    @property
    def has_cell_overrides(self) -> bool:
        """Whether ``cells:`` rules add overrides: the dry-run table and the report then show
        each cell's in an ``overrides`` column (see :func:`join_overrides`)."""
        return any(rule.overrides for rule in self.spec.cells)

    def extra_overrides(self, cell: Cell) -> tuple[str, ...]:
        """The overrides ``cells:`` rules add to ``cell`` (in rule order): the part of its recipe
        that no varied-key column shows; empty for a warm-start source."""
        return () if cell.base is not None else tuple(matched_overrides(self.spec, cell.values))

    def source_of(self, seed: int) -> Cell | None:
        return next((c for c in self.sources() if c.seed == seed), None)

    def cells(self) -> list[Cell]:
        sources = {c.seed: str(self.output_dir / c.id) for c in self.sources()}
        return expand(self.spec, sources)

    def recipe(self, cell: Cell) -> Recipe:
        """The cell's validated recipe (named by its id, writing under the grid's folder)."""
        # quoted: an id of digits only would otherwise read as a number
        extra = [override_text("name", cell.id), override_text("output_dir", str(self.output_dir))]
        base = self.base if cell.base is None else (self.path.parent / cell.base).resolve()
        what = "warm-start source" if cell.base is not None else f"cell {cell.label()}"
        try:
            return load_recipe(base, [*cell.overrides, *extra], anchor=self.path.parent)
        except RecipeError as exc:
            raise RecipeError(f"{self.path}: {what} (seed {cell.seed}): {exc}") from None


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")).strip('"')


def join_overrides(overrides: tuple[str, ...] | list[str]) -> str:
    """Overrides as one table cell: ``a=1; b=[1, 2]`` (values may hold commas); empty if none."""
    return "; ".join(overrides)


def override_text(key: str, value: Any) -> str:
    """``key=<value as JSON>`` (JSON is YAML, so the override parser reads the value back exactly)."""
    return f"{key}={json.dumps(value)}"


def axis_overrides(key: str, value: Any) -> list[str]:
    """A grid axis sets its key to the value: a mapping replaces the section whole (an override
    alone would merge into it)."""
    if isinstance(value, dict):
        return [f"~{key}", override_text(key, value)]
    return [override_text(key, value)]


def cell_id(overrides: tuple[str, ...] | list[str]) -> str:
    """A stable id for a set of overrides: the same overrides in any order give the same id."""
    canonical = sorted(
        (o.key, o.delete, json.dumps(o.value, sort_keys=True))
        for o in map(parse_override, overrides)
    )
    return hashlib.sha1(json.dumps(canonical).encode()).hexdigest()[:10]


def _axes(spec: GridFile) -> list[list[tuple[tuple[str, Any], ...]]]:
    axes = [[((key, value),) for value in values] for key, values in spec.grid.items()]
    for group in spec.zip:
        keys = list(group)
        axes.append(
            [tuple(zip(keys, values, strict=True)) for values in zip(*group.values(), strict=True)]
        )
    if spec.variants:
        axes.append([((VARIANT, name),) for name in spec.variants])
    return axes


def _matches(values: dict[str, Any], partial: dict[str, Any]) -> bool:
    return all(key in values and values[key] == value for key, value in partial.items())


def matched_overrides(spec: GridFile, values: dict[str, Any]) -> list[str]:
    """The extra overrides of the ``cells:`` rules that match ``values``, in rule order."""
    return [o for rule in spec.cells if _matches(values, rule.match) for o in rule.overrides]


def expand(spec: GridFile, sources: dict[int, str] | None = None) -> list[Cell]:
    """Every cell of the grid, in file order (seeds innermost), exclusions removed. ``sources``:
    the warm-start source run directory of each seed."""
    cells = []
    for combo in itertools.product(*_axes(spec)):
        assignment = tuple(pair for part in combo for pair in part)
        values = dict(assignment)
        if any(_matches(values, rule) for rule in spec.exclude):
            continue
        extra = matched_overrides(spec, values)
        varied = [
            o
            for k, v in assignment
            for o in (spec.variants[v] if k == VARIANT else axis_overrides(k, v))
        ]
        for seed in spec.seeds:
            warm = [override_text("warm_start.source", sources[seed])] if sources else []
            overrides = (*spec.overrides, *warm, *varied, *extra, *spec.seeded(seed))
            cells.append(Cell(assignment, seed, overrides))
    return cells


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid file; every mistake is one line naming the file and the key."""
    path = Path(path)
    data = read_yaml(path, RecipeError)
    if not isinstance(data, dict):
        raise RecipeError(
            f"{path}: a grid file must be a mapping of keys, got {type(data).__name__}"
        )
    try:
        spec = GridFile.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, GridFile, str(path), {})) from None
    overrides = [
        *spec.overrides,
        *(o for c in spec.cells for o in c.overrides),
        *(o for variant in spec.variants.values() for o in variant),
        *(spec.warm_start.overrides if spec.warm_start else []),
        *(override_text(key, values[0]) for key, values in spec.grid.items()),
        *(override_text(key, values[0]) for group in spec.zip for key, values in group.items()),
    ]
    for text in overrides:
        try:
            parse_override(text)
        except RecipeError as exc:
            raise RecipeError(f"{path}: {exc}") from None
    grid = Grid(path, spec)
    if not grid.base.is_file():
        raise UsageError(f"{path}: base: recipe {spec.base!r} not found (looked for {grid.base})")
    if spec.warm_start is not None and not (path.parent / spec.warm_start.base).is_file():
        raise UsageError(
            f"{path}: warm_start.base: recipe {spec.warm_start.base!r} not found (looked for "
            f"{(path.parent / spec.warm_start.base).resolve()})"
        )
    return grid
