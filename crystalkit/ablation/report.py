"""Aggregate a grid: one row per cell (seeds pooled), mean ± std of each metric, written as a rich
table, CSV, Markdown, LaTeX and a PNG bar chart with error bars."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from crystalkit.ablation.grid import Grid, compact
from crystalkit.ablation.runner import RESULTS_FILE, cell_dir, cell_state
from crystalkit.io import atomic_write_bytes, atomic_write_text


def _metric(results: dict[str, Any], name: str) -> float | None:
    value: Any = results
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, int | float) else None


@dataclass
class Row:
    """One grid point: its varied values and, per metric, the values of its finished seeds."""

    values: dict[str, Any]
    seeds: int = 0
    finished: int = 0
    metrics: dict[str, list[float]] = field(default_factory=dict)

    def mean(self, name: str) -> float | None:
        values = self.metrics.get(name, [])
        return statistics.fmean(values) if values else None

    def std(self, name: str) -> float | None:
        values = self.metrics.get(name, [])
        return statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)


def aggregate(grid: Grid) -> tuple[list[Row], list[str]]:
    """Rows in ranking order (best first, unfinished last) and the metric names found."""
    rows: dict[str, Row] = {}
    names: dict[str, None] = {grid.spec.metric.name: None}
    for cell in grid.cells():
        key = json.dumps(cell.assignment, sort_keys=True)  # values may be mappings or lists
        row = rows.setdefault(key, Row(cell.values))
        row.seeds += 1
        directory = cell_dir(grid, cell)
        if cell_state(directory) != "done":
            continue
        results = json.loads((directory / RESULTS_FILE).read_text(encoding="utf-8"))
        row.finished += 1
        flat = {
            "accuracy": results.get("accuracy"),
            "train_seconds": results.get("train_seconds"),
            "chance": results.get("chance"),
        }
        flat |= {f"per_category.{k}": v for k, v in results.get("per_category", {}).items()}
        flat[grid.spec.metric.name] = _metric(results, grid.spec.metric.name)
        for name, value in flat.items():
            if isinstance(value, int | float):
                row.metrics.setdefault(name, []).append(float(value))
                if name != "chance":  # drawn as a line in the chart, not a column
                    names.setdefault(name, None)
    metric, sign = grid.spec.metric.name, (-1 if grid.spec.metric.mode == "max" else 1)

    def rank(row: Row) -> tuple[int, float]:
        mean = row.mean(metric)
        return (1, 0.0) if mean is None else (0, sign * mean)

    return sorted(rows.values(), key=rank), list(names)


def _fmt(row: Row, name: str, scale: float) -> str:
    mean, std = row.mean(name), row.std(name)
    if mean is None:
        return "—"
    return f"{mean * scale:.1f} ± {std * scale:.1f}" if row.finished > 1 else f"{mean * scale:.1f}"


def _scale(name: str) -> float:
    return 1.0 if name == "train_seconds" else 100.0


def _header(grid: Grid, names: list[str]) -> list[str]:
    shown = [n.removeprefix("per_category.") for n in names]
    return [*grid.varied_keys, "seeds", *(n if n == "train_seconds" else f"{n} (%)" for n in shown)]


def _cells(grid: Grid, row: Row, names: list[str]) -> list[str]:
    varied = [compact(row.values.get(k)) for k in grid.varied_keys]
    return [*varied, f"{row.finished}/{row.seeds}", *(_fmt(row, n, _scale(n)) for n in names)]


def to_csv(grid: Grid, rows: list[Row], names: list[str]) -> str:
    """Tidy CSV: the varied keys, then mean and std columns per metric."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        [
            *grid.varied_keys,
            "seeds",
            "finished",
            *(f"{n}_{s}" for n in names for s in ("mean", "std")),
        ]
    )
    for row in rows:
        stats = [row.mean(n) for n in names]
        stds = [row.std(n) for n in names]
        writer.writerow(
            [
                *(compact(row.values.get(k)) for k in grid.varied_keys),
                row.seeds,
                row.finished,
                *(
                    "" if v is None else f"{v:.6g}"
                    for pair in zip(stats, stds, strict=True)
                    for v in pair
                ),
            ]
        )
    return out.getvalue()


def to_markdown(grid: Grid, rows: list[Row], names: list[str]) -> str:
    header = _header(grid, names)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cells(grid, row, names)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
    for a, b in (
        ("\\", r"\textbackslash{}"),
        ("_", r"\_"),
        ("%", r"\%"),
        ("&", r"\&"),
        ("#", r"\#"),
        ("±", r"$\pm$"),
    ):
        text = text.replace(a, b)
    return text


def to_latex(grid: Grid, rows: list[Row], names: list[str]) -> str:
    header = _header(grid, names)
    lines = [
        r"\begin{tabular}{"
        + "l" * len(grid.varied_keys)
        + "r" * (len(header) - len(grid.varied_keys))
        + "}",
        r"\toprule",
        " & ".join(_latex_escape(h) for h in header) + r" \\",
        r"\midrule",
        *(" & ".join(_latex_escape(c) for c in _cells(grid, row, names)) + r" \\" for row in rows),
        r"\bottomrule",
        r"\end{tabular}",
    ]
    return "\n".join(lines) + "\n"


def to_png(grid: Grid, rows: list[Row]) -> bytes:
    """Bar chart of the ranking metric, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = grid.spec.metric.name
    scale = _scale(metric)
    shown = [r for r in rows if r.mean(metric) is not None]
    labels = [
        ", ".join(compact(r.values.get(k)) for k in grid.varied_keys) or "base" for r in shown
    ]
    means = [r.mean(metric) * scale for r in shown]
    errors = [(r.std(metric) or 0.0) * scale for r in shown]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(shown) + 2), 3.6), layout="constrained")
    ax.bar(range(len(shown)), means, yerr=errors, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(shown)), labels, rotation=30, ha="right")
    ax.set_ylabel(metric if scale == 1 else f"{metric} (%)")
    ax.set_title(f"{grid.path.stem}: {', '.join(grid.varied_keys)}")
    chance = [r.mean("chance") for r in shown if r.mean("chance") is not None]
    if chance and not math.isnan(chance[0]):
        ax.axhline(chance[0] * scale, color="grey", linestyle="--", linewidth=1, label="chance")
        ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def write_report(grid: Grid, console: Console) -> dict[str, Path]:
    """Print the table and write ``report.{csv,md,tex,png}`` into the grid's output folder."""
    rows, names = aggregate(grid)
    table = Table(
        title=f"{grid.path} — ranked by {grid.spec.metric.name} ({grid.spec.metric.mode})"
    )
    for i, name in enumerate(_header(grid, names)):
        table.add_column(name, justify="left" if i < len(grid.varied_keys) else "right")
    for row in rows:
        table.add_row(*_cells(grid, row, names))
    console.print(table)
    out = grid.output_dir
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"report.{ext}" for ext in ("csv", "md", "tex", "png")}
    atomic_write_text(paths["csv"], to_csv(grid, rows, names))
    atomic_write_text(paths["md"], to_markdown(grid, rows, names))
    atomic_write_text(paths["tex"], to_latex(grid, rows, names))
    atomic_write_bytes(paths["png"], to_png(grid, rows))
    return paths
