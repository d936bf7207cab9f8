"""``crystalkit analyze --grid``: every finished cell of an ablation grid analysed (or its saved
analysis read back), seeds of a grid point grouped, the tables written next to the cells."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crystalkit.ablation.grid import load_grid
from crystalkit.ablation.runner import cell_dir, cell_state
from crystalkit.analysis.report import analyze_run, grouped, headline, write_grouped
from crystalkit.errors import UsageError
from crystalkit.runs.files import analysis_file


@dataclass(frozen=True)
class GridAnalysis:
    """The grouped rows (one per grid point, as :func:`~crystalkit.analysis.report.grouped`) and
    the two files written: the Markdown table and the per-cell CSV."""

    rows: list[dict[str, Any]]
    markdown: Path
    seeds_csv: Path


def load_cached(run_dir: Path, split: str, max_samples: int | None) -> dict[str, Any] | None:
    """A run's saved analysis of ``split``, if any and if it analysed ``max_samples`` samples
    (``None``: whatever it analysed): a grid reuses it instead of recomputing."""
    try:
        report = json.loads((run_dir / analysis_file(split)).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(report, dict) or max_samples not in (None, report.get("num_samples")):
        return None
    return report


def analyze_grid(
    grid_path: Path, split: str = "test", max_samples: int | None = None, bench: str | None = None
) -> GridAnalysis:
    """Analyse every finished cell of the grid (a benchmark file's analysis is always recomputed)
    and write ``analysis_SPLIT.md`` and ``analysis_SPLIT_seeds.csv`` (``analysis_bench*`` with
    ``bench``) into the grid's output folder."""
    grid = load_grid(grid_path)
    rows: list[tuple[str, int, dict[str, float]]] = []
    for cell in grid.cells():
        directory = cell_dir(grid, cell)
        if cell_state(directory) != "done":
            continue
        report = None if bench else load_cached(directory, split, max_samples)
        if report is None:
            report = analyze_run(directory, split, max_samples, bench)
        rows.append((cell.label(), cell.seed, headline(report)))
    if not rows:
        raise UsageError(f"{grid_path}: no finished cells to analyse")
    points = grouped(rows)
    stem = grid.output_dir / f"analysis_{'bench' if bench else split}"
    return GridAnalysis(points, *write_grouped(points, rows, stem))
