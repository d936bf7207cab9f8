"""What ``crystalkit ablate --dry-run`` shows: every run a grid trains, as plain rows, each
cell's recipe validated on the way (a bad cell fails here, before anything runs)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from crystalkit.ablation.grid import Cell, Grid, join_overrides
from crystalkit.ablation.runner import State, cell_dir, cell_state


@dataclass(frozen=True)
class PlannedCell:
    """One run: its id, its value of each varied key (``(source)`` for a warm-start source), its
    seed and state, and the overrides ``cells:`` rules add to it (:func:`join_overrides`)."""

    id: str
    values: list[str]
    seed: int
    state: State
    overrides: str


@dataclass(frozen=True)
class Plan:
    """The varied keys (one column each), the warm-start sources (trained first) and the cells;
    ``overrides``: whether ``cells:`` rules add overrides, the part of a recipe no key shows."""

    keys: list[str]
    sources: list[PlannedCell]
    cells: list[PlannedCell]
    overrides: bool


def plan_grid(grid: Grid) -> Plan:
    """Every warm-start source and cell of ``grid``, with its state on disk."""

    def planned(cell: Cell) -> PlannedCell:
        grid.recipe(cell)
        values = [
            json.dumps(cell.values[k]).strip('"') if k in cell.values else "(source)"
            for k in grid.varied_keys
        ]
        state = cell_state(cell_dir(grid, cell))
        overrides = join_overrides(grid.extra_overrides(cell))
        return PlannedCell(cell.id, values, cell.seed, state, overrides)

    sources, cells = grid.sources(), grid.cells()
    return Plan(
        grid.varied_keys,
        [planned(c) for c in sources],
        [planned(c) for c in cells],
        grid.has_cell_overrides,
    )
