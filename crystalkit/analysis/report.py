"""``crystalkit analyze``: one run's analysis written to ``analysis_SPLIT.json`` / ``.png``, and
several runs or a grid's cells side by side (seeds of a grid point grouped: mean and 95 % CI)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from crystalkit.ablation.stats import summary
from crystalkit.analysis.sections import (
    BUCKET_KEY,
    INTERVENTIONS,
    PROBES,
    SECTIONS,
    Collected,
    Headline,
    bucket_headline,
    collect,
)
from crystalkit.errors import UsageError
from crystalkit.evaluation.saved import check_max_samples
from crystalkit.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from crystalkit.runs.files import analysis_file
from crystalkit.runs.load import load_run, run_image_size

#: the numbers a comparison table shows, section by section
HEADLINE: tuple[Headline, ...] = tuple(entry for section in SECTIONS for entry in section.headline)


def analyze_run(
    run_dir: Path, split: str = "test", max_samples: int | None = None, bench: str | None = None
) -> dict[str, Any]:
    """Analyse a run; writes ``analysis_SPLIT.json`` and ``analysis_SPLIT.png`` (``analysis_bench_
    NAME.*`` with a benchmark file) and returns the report."""
    check_max_samples(max_samples)
    recipe, dataset, backbone, method, step = load_run(run_dir)
    if backbone.per_image_grids:
        raise UsageError(
            f"{run_dir}: analyze moves images between samples (a donor image, a blank one); "
            "under backbone.resolution: processor their grids differ (use resolution: fixed)"
        )
    notes = []
    if bench is not None:
        from crystalkit.evaluation.harness import load_samples, resolve_bench

        spec, root = resolve_bench(bench)
        samples, _ = load_samples(spec, root, dataset, run_image_size(dataset, backbone))
        samples = samples[:max_samples] if max_samples else samples
        counterfactual, name = None, f"bench_{spec.name}"
        notes.append("benchmark file: no re-rendered scenes and no scene attributes to probe")
    else:
        data = dataset.split(split)
        total = min(max_samples or recipe.eval.max_samples or len(data), len(data))
        samples = [data[i] for i in range(total)]
        rerender = getattr(data, "counterfactual", None)
        counterfactual = None if rerender is None else (lambda sample: rerender(sample.index))
        name = split
        if counterfactual is None:
            notes.append(f"{recipe.dataset.name}: no re-rendered scenes (answer_changed skipped)")
    if not samples:
        raise UsageError(f"{run_dir}: nothing to analyse in {name}")
    if method.final_k == 0:
        notes.append("no latent block (K = 0): only the rescue section applies")
    data = collect(
        backbone,
        method,
        samples,
        recipe.eval.batch_size,
        recipe.seed,
        counterfactual,
        recipe.eval.area_buckets,
    )
    sections = analyze(data, latent_block=method.final_k > 0)
    report = {"run": str(run_dir), "step": step, "split": name, "notes": notes, **sections}
    report["headline"] = headline(report)
    atomic_write_json(run_dir / analysis_file(name), report)
    atomic_write_bytes(run_dir / analysis_file(name, ".png"), figure(report))
    return report


def analyze(data: Collected, latent_block: bool) -> dict[str, Any]:
    """Every section of :data:`~crystalkit.analysis.sections.SECTIONS` on the collected outputs;
    those that need a latent block are absent without one."""
    report: dict[str, Any] = {"num_samples": len(data.answers)}
    for section in SECTIONS:
        if latent_block or not section.needs_latents:
            report[section.key] = section.measure(data)
    return report


def headline(report: dict[str, Any]) -> dict[str, float]:
    """The comparison table's numbers (NaN where a section, or a part of one, does not apply),
    then each area bucket's intact accuracy (none in a report written before buckets)."""
    numbers = {
        entry.key: entry.read(report[section.key]) if section.key in report else math.nan
        for section in SECTIONS
        for entry in section.headline
    }
    for bucket in report["rescue"].get("per_bucket", {}):
        entry = bucket_headline(bucket)
        numbers[entry.key] = entry.read(report["rescue"])
    return numbers


def entries(keys: Iterable[str]) -> list[Headline]:
    """The rows of a comparison of headlines with ``keys``: :data:`HEADLINE`, with a row per area
    bucket among ``keys`` (in their order) right after the intact accuracy."""
    buckets = [
        bucket_headline(key.removeprefix(BUCKET_KEY))
        for key in dict.fromkeys(keys)
        if key.startswith(BUCKET_KEY)
    ]
    at = 1 + [entry.key for entry in HEADLINE].index("accuracy_intact")
    return [*HEADLINE[:at], *buckets, *HEADLINE[at:]]


def figure(report: dict[str, Any]) -> bytes:
    """Four panels: rescue, X -> Z per layer, Z -> Y per probe, collapse per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4), layout="constrained")
    rescue = report["rescue"]["accuracy"]
    axes[0].bar(list(rescue), [100 * v for v in rescue.values()], color="#4c72b0")
    axes[0].set_title("answer on the corrupted image")
    axes[0].set_ylabel("accuracy (%)")
    for name in INTERVENTIONS:
        moved = report.get("x_to_z", {}).get(name)
        if moved:
            line = axes[1].plot(moved["latent_change"], marker="o", label=name)[0]
            axes[1].plot(moved["image_change"], linestyle="--", color=line.get_color())
    axes[1].set_title("X → Z: latent change (- - image tokens)")
    axes[1].set_xlabel("layer")
    axes[1].set_ylabel("change / instance spread")
    z_to_y = report.get("z_to_y", {})
    shown = [p for p in PROBES if p in z_to_y]
    axes[2].bar(shown, [z_to_y[p]["flip_rate"] for p in shown], color="#dd8452")
    axes[2].set_title("Z → Y: answer flips under a probe")
    collapse = report.get("collapse", {})
    for key, label in (
        ("cosine_across_instances", "across instances"),
        ("cosine_across_indexes", "across indexes"),
    ):
        if collapse.get(key):
            axes[3].plot(collapse[key], marker="o", label=label)
    axes[3].set_title("collapse: centred cosine")
    axes[3].set_xlabel("layer")
    for ax in axes[1], axes[3]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _columns(reports: Sequence[tuple[str, int, dict[str, float]]]) -> list[Headline]:
    """The headline rows of (label, seed, headline) rows: every bucket any of them has."""
    return entries(key for _, _, numbers in reports for key in numbers)


def grouped(reports: Sequence[tuple[str, int, dict[str, float]]]) -> list[dict[str, Any]]:
    """Headlines of (label, seed, headline) rows grouped by label: mean and 95 % CI over seeds."""
    rows: dict[str, list[dict[str, float]]] = {}
    for label, _, numbers in reports:
        rows.setdefault(label, []).append(numbers)
    columns = _columns(reports)
    out = []
    for label, runs in rows.items():
        row: dict[str, Any] = {"label": label, "seeds": len(runs)}
        for entry in columns:
            values = [r[entry.key] for r in runs if not math.isnan(r.get(entry.key, math.nan))]
            if values:
                stats = summary(values)
                row[entry.key] = {"mean": stats.mean, "ci": list(stats.ci) if stats.ci else None}
        out.append(row)
    return out


def side_by_side(reports: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs' reports as :func:`grouped` rows, one per run (labelled by its directory)."""
    return grouped([(report["run"], 0, report["headline"]) for report in reports])


def _cell(value: dict[str, Any] | None) -> str:
    """A grouped value as ``mean [low, high]`` (``mean`` for one seed, ``—`` when absent)."""
    if value is None:
        return "—"
    if value["ci"] is None:
        return f"{value['mean']:.3g}"
    low, high = value["ci"]
    return f"{value['mean']:.3g} [{low:.3g}, {high:.3g}]"


def comparison_table(rows: Sequence[dict[str, Any]]) -> Any:
    """One row per headline measure, one column per run or grid point (``mean [CI]`` over seeds):
    measures are many and runs few, so this shape fits a terminal."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="latent analysis (see docs: Analysis)", show_edge=False)
    table.add_column("measure")
    for row in rows:
        seeds = row["seeds"]
        label = escape(row["label"]) + (f"\n({seeds} seeds)" if seeds > 1 else "")
        table.add_column(label, justify="right", overflow="fold")
    table.add_column("higher means", style="dim")
    for entry in entries(key for row in rows for key in row):
        cells = (_cell(row.get(entry.key)) for row in rows)
        table.add_row(escape(entry.label), *cells, escape(entry.meaning))
    return table


def write_grouped(
    rows: Sequence[dict[str, Any]], seeds: Sequence[tuple[str, int, dict[str, float]]], stem: Path
) -> tuple[Path, Path]:
    """A grid's analysis next to its cells: ``STEM.md`` (one row per grid point: mean [95 % CI]
    over its seeds) and ``STEM_seeds.csv`` (every cell's headline); returns both paths."""
    markdown, per_seed = stem.parent / f"{stem.name}.md", stem.parent / f"{stem.name}_seeds.csv"
    columns = _columns(seeds)
    lines = ["| cell | seeds | " + " | ".join(entry.label for entry in columns) + " |"]
    lines.append("|---" * (len(columns) + 2) + "|")
    for row in rows:
        cells = " | ".join(_cell(row.get(entry.key)) for entry in columns)
        lines.append(f"| {row['label']} | {row['seeds']} | {cells} |")
    atomic_write_text(markdown, "\n".join(lines) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["cell", "seed", *(entry.key for entry in columns)])
    for label, seed, numbers in seeds:
        writer.writerow(
            [label, seed, *(f"{numbers.get(entry.key, math.nan):.6g}" for entry in columns)]
        )
    atomic_write_text(per_seed, buffer.getvalue())
    return markdown, per_seed
