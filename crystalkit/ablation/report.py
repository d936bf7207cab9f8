"""Aggregate a grid: one row per grid point (seeds pooled), mean ± std of each metric, written as a
rich table, CSV, Markdown, LaTeX and a PNG bar chart with error bars, plus every seed's values in
``report_seeds.csv``.

For the ranking metric the report also gives the 95 % prediction interval for one more seed, the
number of collapsed seeds (``collapse_below``) and, with ``compare``, the paired difference of every
row to the compared row: same seed (and, with a warm start, the same starting checkpoint), mean ±
sd, its 95 % confidence interval and each seed's value.

When the grid's ``cells:`` rules add overrides, every table and CSV ends with an ``overrides``
column: the overrides of the row's grid point (the same for all its seeds), empty where none
matched, so rows that the varied keys alone do not describe can be told apart.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from crystalkit.ablation.grid import Grid, compact, join_overrides
from crystalkit.ablation.runner import cell_dir, cell_state
from crystalkit.ablation.stats import paired_differences, summary
from crystalkit.errors import DataWarning
from crystalkit.io import atomic_write_bytes, atomic_write_text, json_problem
from crystalkit.runs.files import RESULTS_FILE


def _metric(results: dict[str, Any], name: str) -> float | None:
    """The number at dotted ``name`` (``per_category.count``); a key may hold dots itself
    (``per_bucket.0.5-5%``): where the rest of the name is a key, it is taken whole."""
    value: Any = results
    rest = name
    while True:
        if not isinstance(value, dict):
            return None
        if rest in value:
            value = value[rest]
            return float(value) if isinstance(value, int | float) else None
        part, dot, rest = rest.partition(".")
        if not dot or part not in value:
            return None
        value = value[part]


@dataclass
class Row:
    """One grid point: its varied values, the overrides ``cells:`` rules add to it, and per metric
    the value of each finished seed."""

    values: dict[str, Any]
    overrides: tuple[str, ...] = ()
    seeds: int = 0
    finished: int = 0
    by_seed: dict[str, dict[int, float]] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, list[float]]:
        return {name: list(values.values()) for name, values in self.by_seed.items()}

    def mean(self, name: str) -> float | None:
        values = self.metrics.get(name, [])
        return statistics.fmean(values) if values else None

    def std(self, name: str) -> float | None:
        values = self.metrics.get(name, [])
        return statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)


def _flatten(results: dict[str, Any], metric: str) -> dict[str, Any]:
    flat = {
        "accuracy": results.get("accuracy"),
        "train_seconds": results.get("train_seconds"),
        "chance": results.get("chance"),
    }
    for section in ("per_category", "per_bucket", "controls"):
        values = results.get(section)
        flat |= {
            f"{section}.{k}": v for k, v in (values if isinstance(values, dict) else {}).items()
        }
    flat[metric] = _metric(results, metric)
    return flat


def _read_results(path: Path) -> dict[str, Any] | None:
    """A finished cell's results; ``None``, with a warning, for a file edited into nonsense (the
    cell then counts as unfinished rather than stopping the whole report)."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        problem = json_problem(exc) if isinstance(exc, ValueError | RecursionError) else exc
        warnings.warn(DataWarning(f"{path}: unreadable ({problem}); cell left out"), stacklevel=2)
        return None
    if not isinstance(results, dict):
        warnings.warn(
            DataWarning(f"{path}: not a JSON object of results; cell left out"), stacklevel=2
        )
        return None
    return results


def aggregate(grid: Grid) -> tuple[list[Row], list[str]]:
    """Rows in ranking order (best first, unfinished last) and the metric names found."""
    rows: dict[str, Row] = {}
    names: dict[str, None] = {grid.spec.metric.name: None}
    for cell in grid.cells():
        key = json.dumps(cell.assignment, sort_keys=True)  # values may be mappings or lists
        row = rows.setdefault(key, Row(cell.values, grid.extra_overrides(cell)))
        row.seeds += 1
        directory = cell_dir(grid, cell)
        if cell_state(directory) != "done":
            continue
        results = _read_results(directory / RESULTS_FILE)
        if results is None:
            continue
        row.finished += 1
        for name, value in _flatten(results, grid.spec.metric.name).items():
            if isinstance(value, int | float):
                row.by_seed.setdefault(name, {})[cell.seed] = float(value)
                if name != "chance":  # drawn as a line in the chart, not a column
                    names.setdefault(name, None)
    metric, sign = grid.spec.metric.name, (-1 if grid.spec.metric.mode == "max" else 1)

    def rank(row: Row) -> tuple[int, float]:
        mean = row.mean(metric)
        return (1, 0.0) if mean is None else (0, sign * mean)

    return sorted(rows.values(), key=rank), list(names)


@dataclass
class Extras:
    """The ranking metric's seed statistics per row, keyed by the row's position."""

    headers: list[str]
    cells: dict[int, list[str]]


def _reference(grid: Grid, rows: list[Row], row: Row) -> Row | None:
    """The row ``row`` is compared with: its own values with the ``compare`` keys set (so with
    other varied keys, every row pairs with the reference at the same values of those)."""
    target = row.values | (grid.spec.compare or {})
    return next((r for r in rows if r.values == target), None)


def _interval(low_high: tuple[float, float] | None, scale: float) -> str:
    return "—" if low_high is None else f"[{low_high[0] * scale:.1f}, {low_high[1] * scale:.1f}]"


def seed_statistics(grid: Grid, rows: list[Row]) -> Extras:
    """Prediction interval, collapsed seeds and paired differences of the ranking metric."""
    metric, scale = grid.spec.metric.name, _scale(grid.spec.metric.name)
    headers = ["95% PI"]
    if grid.spec.collapse_below is not None:
        headers.append(f"collapsed (< {grid.spec.collapse_below * scale:g})")
    if grid.spec.compare:
        headers += ["Δ paired", "Δ 95% CI", "Δ per seed"]
    cells = {}
    for i, row in enumerate(rows):
        values = row.by_seed.get(metric, {})
        out = [_interval(summary(list(values.values())).pi, scale) if values else "—"]
        if grid.spec.collapse_below is not None:
            low = sum(v < grid.spec.collapse_below for v in values.values())
            out.append(f"{low}/{len(values)}" if values else "—")
        if grid.spec.compare:
            reference = _reference(grid, rows, row)
            diffs = {}
            if reference is not None and reference is not row:
                diffs = paired_differences(values, reference.by_seed.get(metric, {}))
            if reference is row:
                out += ["(reference)", "", ""]
            elif diffs:
                stats = summary(list(diffs.values()))
                sd = "" if stats.sd is None else f" ± {stats.sd * scale:.1f}"
                out += [
                    f"{stats.mean * scale:+.1f}{sd}",
                    _interval(stats.ci, scale),
                    " ".join(f"{d * scale:+.1f}" for d in diffs.values()),
                ]
            else:
                out += ["—", "—", "—"]
        cells[i] = out
    return Extras(headers, cells)


def _fmt(row: Row, name: str, scale: float) -> str:
    mean, std = row.mean(name), row.std(name)
    if mean is None:
        return "—"
    return f"{mean * scale:.1f} ± {std * scale:.1f}" if row.finished > 1 else f"{mean * scale:.1f}"


def _scale(name: str) -> float:
    return 1.0 if name == "train_seconds" else 100.0


#: the last column of every table and CSV of a grid with ``cells:`` overrides
OVERRIDES = "overrides"


def _overrides_header(grid: Grid) -> list[str]:
    return [OVERRIDES] if grid.has_cell_overrides else []


def _overrides_cell(grid: Grid, row: Row) -> list[str]:
    return [join_overrides(row.overrides)] if grid.has_cell_overrides else []


def _shown(name: str) -> str:
    """A metric's column name: a category alone, an area bucket as ``area <0.5%``."""
    if name.startswith("per_bucket."):
        return "area " + name.removeprefix("per_bucket.")
    return name.removeprefix("per_category.")


def _header(grid: Grid, names: list[str], extras: Extras | None = None) -> list[str]:
    shown = [_shown(n) for n in names]
    metrics = [n if n == "train_seconds" else f"{n} (%)" for n in shown]
    metric_at = 1 + len(grid.varied_keys) + 1  # right after the ranking metric
    header = [*grid.varied_keys, "seeds", *metrics]
    extra = extras.headers if extras else []
    return header[:metric_at] + extra + header[metric_at:] + _overrides_header(grid)


def _cells(grid: Grid, row: Row, names: list[str], extras: list[str] | None = None) -> list[str]:
    varied = [compact(row.values.get(k)) for k in grid.varied_keys]
    metrics = [_fmt(row, n, _scale(n)) for n in names]
    return [
        *varied,
        f"{row.finished}/{row.seeds}",
        metrics[0],
        *(extras or []),
        *metrics[1:],
        *_overrides_cell(grid, row),
    ]


def to_csv(grid: Grid, rows: list[Row], names: list[str]) -> str:
    """Tidy CSV: the varied keys, then mean and std columns per metric (then the overrides)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        [
            *grid.varied_keys,
            "seeds",
            "finished",
            *(f"{n}_{s}" for n in names for s in ("mean", "std")),
            *_overrides_header(grid),
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
                *_overrides_cell(grid, row),
            ]
        )
    return out.getvalue()


def to_seeds_csv(grid: Grid, rows: list[Row], names: list[str]) -> str:
    """Long format: one line per finished cell (varied keys, seed, every metric, the overrides)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*grid.varied_keys, "seed", *names, *_overrides_header(grid)])
    for row in rows:
        seeds = sorted({seed for values in row.by_seed.values() for seed in values})
        for seed in seeds:
            writer.writerow(
                [
                    *(compact(row.values.get(k)) for k in grid.varied_keys),
                    seed,
                    *(_g(row.by_seed.get(n, {}).get(seed)) for n in names),
                    *_overrides_cell(grid, row),
                ]
            )
    return out.getvalue()


def _g(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def to_markdown(grid: Grid, rows: list[Row], names: list[str], extras: Extras | None = None) -> str:
    header = _header(grid, names, extras)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [
        "| "
        + " | ".join(
            _markdown_escape(c) for c in _cells(grid, row, names, extras and extras.cells[i])
        )
        + " |"
        for i, row in enumerate(rows)
    ]
    return "\n".join(lines) + "\n"


def _markdown_escape(text: str) -> str:
    """A cell that holds ``|`` (an override's value may) must not end the cell."""
    return text.replace("|", r"\|")


_LATEX = {
    "\\": r"\textbackslash{}",
    "_": r"\_",
    "%": r"\%",
    "&": r"\&",
    "#": r"\#",
    "$": r"\$",
    "{": r"\{",
    "}": r"\}",
    "^": r"\^{}",
    "~": r"\~{}",
    "<": r"\textless{}",  # as text, not the font's inverted exclamation mark
    ">": r"\textgreater{}",
    "±": r"$\pm$",
}


def _latex_escape(text: str) -> str:
    """Character by character, so one replacement's output is never escaped again (mappings and
    overrides bring braces and dollars)."""
    return "".join(_LATEX.get(c, c) for c in text)


def to_latex(grid: Grid, rows: list[Row], names: list[str], extras: Extras | None = None) -> str:
    header = _header(grid, names, extras)
    lines = [
        r"\begin{tabular}{"
        + "l" * len(grid.varied_keys)
        + "r" * (len(header) - len(grid.varied_keys) - len(_overrides_header(grid)))
        + "l" * len(_overrides_header(grid))
        + "}",
        r"\toprule",
        " & ".join(_latex_escape(h) for h in header) + r" \\",
        r"\midrule",
        *(
            " & ".join(
                _latex_escape(c) for c in _cells(grid, row, names, extras and extras.cells[i])
            )
            + r" \\"
            for i, row in enumerate(rows)
        ),
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
    extras = seed_statistics(grid, rows)
    table = Table(
        title=f"{grid.path} — ranked by {grid.spec.metric.name} ({grid.spec.metric.mode})"
    )
    header = _header(grid, names, extras)
    for i, name in enumerate(header):
        if grid.has_cell_overrides and i == len(header) - 1:  # overrides: long, shown whole
            table.add_column(escape(name), justify="left", overflow="fold")
        else:
            table.add_column(escape(name), justify="left" if i < len(grid.varied_keys) else "right")
    for i, row in enumerate(rows):
        table.add_row(*(escape(c) for c in _cells(grid, row, names, extras.cells[i])))
    console.print(table)
    out = grid.output_dir
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"report.{ext}" for ext in ("csv", "md", "tex", "png")}
    paths["seeds"] = out / "report_seeds.csv"
    atomic_write_text(paths["csv"], to_csv(grid, rows, names))
    atomic_write_text(paths["seeds"], to_seeds_csv(grid, rows, names))
    atomic_write_text(paths["md"], to_markdown(grid, rows, names, extras))
    atomic_write_text(paths["tex"], to_latex(grid, rows, names, extras))
    atomic_write_bytes(paths["png"], to_png(grid, rows))
    return paths
