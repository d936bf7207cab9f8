"""The ``crystalkit`` command line (Typer).

Every command turns user mistakes (:class:`~crystalkit.errors.UsageError`) and errors of
third-party component code (:class:`~crystalkit.errors.PluginError`) into one red line on stderr;
anything else is a bug and keeps its traceback. Exit codes:

* 0 — success;
* 1 — a bug in crystalkit (with its traceback), or cells of ``crystalkit ablate`` that failed;
* 2 — a user mistake (recipe, grid, data, checkpoint or argument): fix the input;
* 3 — a plugin's code (a plugin package, a ``file.py:attr`` or ``module:attr`` component) raised
  or broke its contract: the line names the component, where it comes from and the file:line.

``crystalkit --debug COMMAND ...`` (or ``CRYSTALKIT_DEBUG=1``) shows the full traceback of any
error instead of the one line.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from crystalkit.errors import (
    DataWarning,
    PerformanceWarning,
    PluginError,
    ProvenanceWarning,
    UsageError,
    did_you_mean,
)
from crystalkit.registry import PluginWarning

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="crystalkit",
    help="Crystallized latent visual reasoning: train, evaluate and inspect recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
recipe_app = typer.Typer(help="Show, validate and describe recipes.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
ablate_app = typer.Typer(
    help="Run an ablation grid (resumable) and aggregate it.", invoke_without_command=True
)
app.add_typer(ablate_app, name="ablate")

out = Console()
err = Console(stderr=True)

DEBUG_ENV = "CRYSTALKIT_DEBUG"
#: warnings shown as one ``warning:`` line each
_ONE_LINE_WARNINGS = (PluginWarning, DataWarning, PerformanceWarning, ProvenanceWarning)
#: set by ``--debug`` for the command being run
_debug = False


def debugging() -> bool:
    """Whether errors keep their traceback: ``--debug`` or ``CRYSTALKIT_DEBUG=1``."""
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return _debug or env


@app.callback()
def main_options(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            help=f"show the full traceback of any error (also: {DEBUG_ENV}=1)",
        ),
    ] = False,
) -> None:
    """Crystallized latent visual reasoning: train, evaluate and inspect recipes."""
    global _debug
    _debug = debug


def user_errors(func: F) -> F:
    """Report :class:`UsageError` as one line with exit code 2 and :class:`PluginError` as one line
    with exit code 3 (both re-raised unchanged when :func:`debugging`); show plugin and data
    warnings as one line each, when they happen. Every warning is shown once: a warning raised on each
    forward must neither flood the terminal nor pile up in memory."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        shown: set[tuple[type[Warning], str]] = set()
        original = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            if (category, str(message)) in shown:
                return
            shown.add((category, str(message)))
            if issubclass(category, _ONE_LINE_WARNINGS):
                err.print(
                    f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True
                )
            else:
                original(message, category, filename, lineno, file, line)

        with warnings.catch_warnings():
            for category in _ONE_LINE_WARNINGS:
                warnings.simplefilter("always", category)
            warnings.showwarning = show
            try:
                return func(*args, **kwargs)
            except (UsageError, PluginError) as exc:
                if debugging():
                    raise
                err.print(
                    f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
                )
                raise typer.Exit(3 if isinstance(exc, PluginError) else 2) from None

    return wrapper  # type: ignore[return-value]


RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file", show_default=False)]
LatentBlockOption = Annotated[
    str | None,
    typer.Option(
        help="forced: the prompt holds the latent template and block; generated: the model "
        "writes them itself, then the answer (default: the recipe's eval.latent_block)",
        show_default=False,
    ),
]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="overrides like train.lr=3e-4 or ~eval.max_samples", show_default=False),
]


@app.command()
@user_errors
def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    resume: Annotated[
        bool, typer.Option(help="continue the run from its latest checkpoint")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="replace an existing run of the same name")
    ] = False,
    run_dir: Annotated[
        Path | None, typer.Option(help="output folder (default OUTPUT_DIR/NAME)")
    ] = None,
    logger: Annotated[
        list[str] | None,
        typer.Option(
            help="also log metrics to tensorboard, wandb or a plugin's logger, besides the "
            "recipe's train.loggers (repeat for several; see `crystalkit list loggers`)",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Train a recipe; prints held-out accuracy at the end."""
    from crystalkit.config import load_recipe
    from crystalkit.training.loggers import named_loggers
    from crystalkit.training.trainer import check_resumable
    from crystalkit.training.trainer import train as run_training

    resolved = load_recipe(recipe, overrides or [])
    if resume:
        check_resumable(resolved, run_dir)
    result = run_training(
        resolved,
        run_dir=run_dir,
        resume=resume,
        overwrite=overwrite,
        console=err,
        loggers=named_loggers(logger or []),
    )
    if result.final is not None:
        _print_eval(result.final, resolved.eval.final_split, result.run_dir)


@app.command("eval")
@user_errors
def evaluate_run(
    run_dir: Annotated[Path, typer.Argument(help="a run directory made by `crystalkit train`")],
    split: Annotated[str, typer.Option(help="dataset split to evaluate")] = "test",
    max_samples: Annotated[int | None, typer.Option(help="evaluate at most this many")] = None,
    corrupted: Annotated[
        bool, typer.Option(help="show the model the recipe's corrupted images instead")
    ] = False,
    latents: Annotated[
        str,
        typer.Option(
            help="with --corrupted: the latent block the answer reads — own (computed from the "
            "corrupted image), copied (from the intact image, as in training), no_copy (from no "
            "image)"
        ),
    ] = "own",
    bench: Annotated[
        str | None,
        typer.Option(
            help="score a benchmark: synthetic, a .tsv/.jsonl file or a .yaml declaring one"
        ),
    ] = None,
    replace: Annotated[
        list[str] | None,
        typer.Option(
            help="latent replacements: zero, mean, shuffle, swap (repeat the option or separate "
            "with commas; accuracy drops)"
        ),
    ] = None,
    latent_block: LatentBlockOption = None,
    resolution: Annotated[
        str | None,
        typer.Option(
            help="with --bench: the backbone's resolution — fixed (the recipe's square "
            "image_size) or processor (the image processor's own size per image); default "
            "processor for a pretrained Qwen-VL or LLaVA checkpoint (name_or_path), else the "
            "recipe's"
        ),
    ] = None,
) -> None:
    """Re-evaluate a saved run's latest checkpoint (on its dataset, or on a benchmark file)."""
    from crystalkit.evaluation.saved import evaluate_bench, evaluate_replacements, evaluate_run_dir

    chosen = [
        flag
        for flag, on in (("--corrupted", corrupted), ("--bench", bench), ("--replace", replace))
        if on
    ]
    if len(chosen) > 1:
        raise UsageError(f"{' and '.join(chosen)} are separate evaluations; pass one of them")
    if resolution is not None and bench is None:
        raise UsageError("--resolution applies to --bench evaluations")
    if replace is not None:
        names = [r.strip() for value in replace for r in value.split(",") if r.strip()]
        _print_replacements(
            evaluate_replacements(run_dir, split, names, max_samples, latent_block), run_dir
        )
        return
    if bench is not None:
        _print_bench(evaluate_bench(run_dir, bench, max_samples, latent_block, resolution), run_dir)
        return
    result = evaluate_run_dir(run_dir, split, max_samples, corrupted, latents, latent_block)
    notes = ["corrupted"] if corrupted else []
    notes += [f"{latents} latents"] if latents != "own" else []
    if result.wrote_block is not None:
        notes.append(f"generated latents, {result.wrote_block:.0%} wrote the block")
    _print_eval(result, split + (f" ({', '.join(notes)})" if notes else ""), run_dir)


def _print_replacements(summary: dict[str, Any], run_dir: Path) -> None:
    written = "replaced" in summary  # generated latents: the written block was replaced
    title = f"{run_dir} — latent replacements on {summary['split']}"
    table = Table(title=title, show_edge=False)
    for column in ("latents", "accuracy", "drop", *(("replaced",) if written else ())):
        table.add_column(column, justify="left" if column == "latents" else "right")
    for name, accuracy in summary["accuracy"].items():
        drop = summary["drop"].get(name)
        row = [name, f"{accuracy:.1%}", "" if drop is None else f"{drop:+.1%}"]
        if written:
            replaced = summary["replaced"].get(name)
            row.append("" if replaced is None else f"{replaced:.0%}")
        table.add_row(*row)
    out.print(table)
    if written:
        out.print(f"generated latents, {summary['wrote_block']:.0%} wrote the block")


def _print_bench(summary: dict[str, Any], run_dir: Path) -> None:
    title = f"{run_dir} — {summary['bench']} ({summary['scorer']})"
    out.print(_category_table(title, summary["per_category"], summary["accuracy"]))
    _print_buckets(summary["per_bucket"], summary["per_bucket_samples"])
    out.print(
        f"{summary['bench']} score {summary['score']:.1%} on {summary['num_samples']} samples; "
        f"{len(summary['skipped'])} rows skipped"
    )
    for row in summary["skipped"]:
        err.print(f"[yellow]skipped[/] row {escape(str(row['index']))}: {escape(row['reason'])}")


@app.command("inspect")
@user_errors
def inspect_run(
    run_dir: Annotated[Path, typer.Argument(help="a run directory made by `crystalkit train`")],
    sample: Annotated[int, typer.Option(help="index of the sample to draw")] = 0,
    split: Annotated[str, typer.Option(help="dataset split")] = "test",
    out_png: Annotated[
        Path | None,
        typer.Option("--out", help="figure path (default: RUN_DIR/inspect_SPLIT_I.png)"),
    ] = None,
    layer: Annotated[
        int, typer.Option(help="decoder layer of the attention maps (-1 = last)")
    ] = -1,
    grounding: Annotated[
        bool, typer.Option(help="also average the grounding score over the split")
    ] = True,
    max_samples: Annotated[
        int | None, typer.Option(help="grounding over at most this many")
    ] = None,
) -> None:
    """Draw where the latents look for one sample; score their grounding over a split."""
    from crystalkit.evaluation.inspect import inspect_run_dir

    written = inspect_run_dir(run_dir, sample, split, out_png, layer, grounding, max_samples)
    err.print(f"figure: {written.figure}")
    if written.grounding is not None:
        summary = written.grounding
        out.print(
            f"grounding {summary['grounding']:.2f} over {summary['num_samples']} {split} samples "
            f"(layer {layer}; 1.00 = latents attend to the object no more than to any other area)"
        )


@app.command("analyze")
@user_errors
def analyze_runs(
    run_dirs: Annotated[
        list[Path] | None, typer.Argument(help="run directories made by `crystalkit train`")
    ] = None,
    split: Annotated[str, typer.Option(help="dataset split to analyse")] = "test",
    max_samples: Annotated[
        int | None, typer.Option(help="analyse at most this many (default: eval.max_samples)")
    ] = None,
    bench: Annotated[
        str | None, typer.Option(help="analyse on a benchmark file instead (as eval --bench)")
    ] = None,
    grid: Annotated[
        Path | None, typer.Option(help="analyse every finished cell of a grid, seeds grouped")
    ] = None,
) -> None:
    """Do the latents read the image, does the answer read them, do they rescue the corrupted
    path? Writes RUN_DIR/analysis_SPLIT.{json,png}; several runs or a grid: side by side."""
    from crystalkit.analysis.report import analyze_run, comparison_table, side_by_side

    if grid is not None:
        if run_dirs:
            raise UsageError("analyze: pass run directories or --grid, not both")
        from crystalkit.analysis.grid import analyze_grid

        analysis = analyze_grid(grid, split, max_samples, bench)
        err.print(f"{analysis.markdown} and {analysis.seeds_csv.name}", highlight=False)
        out.print(comparison_table(analysis.rows))
        return
    if not run_dirs:
        raise UsageError("analyze: pass one or more run directories, or --grid FILE")
    reports = []
    for run_dir in run_dirs:  # each run's files and notes shown as soon as it is analysed
        report = analyze_run(run_dir, split, max_samples, bench)
        err.print(f"{run_dir}: analysis_{report['split']}.json and .png", highlight=False)
        for note in report["notes"]:
            err.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
        reports.append(report)
    out.print(comparison_table(side_by_side(reports)))


@app.command()
@user_errors
def generate(
    run_dir: Annotated[Path, typer.Argument(help="a run directory made by `crystalkit train`")],
    image: Annotated[
        list[Path] | None, typer.Option(help="image file; repeat for several queries")
    ] = None,
    question: Annotated[
        list[str] | None,
        typer.Option(help="question about the --image at the same position (one serves all)"),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(help="multiple-choice option, repeated in order A, B, ... (all queries)"),
    ] = None,
    input_file: Annotated[
        Path | None,
        typer.Option("--input", help="JSONL of {image, question, options?} rows instead"),
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(min=1, help="answer length (default: eval.max_new_tokens)")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="queries per batch (default: eval.batch_size)")
    ] = None,
    corrupted: Annotated[
        bool, typer.Option(help="answer from the recipe's corrupted images, as eval does")
    ] = False,
    latent_block: LatentBlockOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines, not a table")] = False,
) -> None:
    """Answer questions about your own images with a trained run (the evaluation's computation)."""
    from crystalkit.evaluation.predict import predict, queries_from_args, read_queries

    if input_file is not None:
        if image or question or option:
            raise UsageError("generate: --input replaces --image/--question/--option; pass one")
        queries = read_queries(input_file)
    else:
        queries = queries_from_args(image or [], question or [], option or [])
    answers = predict(
        run_dir,
        queries,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        corrupted=corrupted,
        latent_block=latent_block,
    )
    if as_json:
        for answer in answers:
            out.print(json.dumps(answer), highlight=False, markup=False, soft_wrap=True)
        return
    table = Table(title=f"{run_dir} — answers", show_edge=False)
    written = any("written" in answer for answer in answers)  # generated latents
    for column in ("image", "question", *(["written"] if written else []), "answer", "choice"):
        table.add_column(column)
    for answer in answers:
        cells = (
            answer["image"],
            answer["question"],
            *([answer["written"]] if written else []),
            answer["answer"],
            answer["choice"] or "",
        )
        table.add_row(*(escape(cell) for cell in cells))
    out.print(table)


def _category_table(title: str, per_category: dict[str, float], overall: float) -> Table:
    table = Table(title=title, show_edge=False)
    table.add_column("category")
    table.add_column("accuracy", justify="right")
    for category, accuracy in per_category.items():
        table.add_row(escape(category) or "—", f"{accuracy:.1%}")
    table.add_row("[bold]overall", f"[bold]{overall:.1%}")
    return table


def _print_buckets(per_bucket: dict[str, float], samples: dict[str, int]) -> None:
    """Accuracy per area bucket of the evidence, with each bucket's number of samples (a thin
    bucket's accuracy is noisy); nothing when no sample had evidence boxes."""
    if not per_bucket:
        return
    table = Table(show_edge=False)
    table.add_column("evidence area")
    table.add_column("accuracy", justify="right")
    table.add_column("n", justify="right")
    for bucket, accuracy in per_bucket.items():
        table.add_row(escape(bucket), f"{accuracy:.1%}", str(samples[bucket]))
    out.print(table)


def _print_eval(result: Any, split: str, run_dir: Path) -> None:
    out.print(_category_table(f"{run_dir} — {split}", result.per_category, result.accuracy))
    _print_buckets(result.per_bucket, result.per_bucket_samples)
    out.print(
        f"{split} accuracy {result.accuracy:.1%} on {result.num_samples} samples "
        f"(chance {result.chance:.1%})"
    )


@app.command("list")
@user_errors
def list_components(
    kind: Annotated[
        str | None, typer.Argument(help="backbones, datasets, corruptions, ...")
    ] = None,
    name: Annotated[
        str | None,
        typer.Argument(help="one component (a name or import path): show its parameters"),
    ] = None,
) -> None:
    """List registered components (built-in and plugins); with NAME, one component's parameters."""

    from crystalkit.registries import ALL
    from crystalkit.registry import source_text

    if kind is not None:
        kind = kind if kind in ALL else f"{kind}s" if f"{kind}s" in ALL else kind
        if kind not in ALL:
            raise UsageError(
                f"unknown kind {kind!r}{did_you_mean(kind, ALL)}; valid: {', '.join(ALL)}"
            )
    if name is not None:
        _print_component(ALL[kind], name)
        return
    for registry in [ALL[kind]] if kind else ALL.values():
        table = Table(title=registry.kind, title_justify="left", show_edge=False)
        table.add_column("name", style="bold cyan", no_wrap=True)
        table.add_column("source")
        table.add_column("description")
        for entry in registry.entries():
            claims = registry.clash(entry.name)
            source = (
                "claimed twice: " + " and ".join(source_text(c) for c in claims)
                if claims
                else source_text(entry)
            )
            table.add_row(entry.name, source, _prose(entry.description))
        if not len(table.rows):
            table.add_row(
                "—", "", f"none registered (entry point group {registry.entry_point_group})"
            )
        out.print(table)


def _prose(text: str) -> Any:
    """Docstring text for the terminal: `code` spans styled instead of backticked, and nothing
    read as rich markup (``sg[h_intact]`` stays as written)."""
    from rich.text import Text

    styled = Text()
    for i, part in enumerate(text.split("`")):
        styled.append(part, style="cyan" if i % 2 else None)
    return styled


def _print_component(registry: Any, name: str) -> None:
    """One component: where it comes from, what it does, and its parameters."""
    from rich.text import Text

    from crystalkit.params import config_model, param_rows
    from crystalkit.registry import object_file, source_text

    entry = registry.entry(name)
    singular = registry.singular
    defined = getattr(entry.obj, "__module__", "?") + "." + getattr(entry.obj, "__qualname__", "")
    where = object_file(entry.obj)
    out.print(Text.assemble((f"{singular} {entry.name}", "bold cyan"), f"  ({source_text(entry)})"))
    out.print(Text(f"defined by {defined}" + (f" in {where}" if where else ""), style="dim"))
    if entry.description:
        out.print(_prose(entry.description))
    rows = param_rows(config_model(entry.obj))
    if not rows:
        out.print(Text("no parameters", style="dim"))
        return
    table = Table(show_edge=False)
    for column in ("key", "type", "default", "constraint", "description"):
        table.add_column(column, style="bold" if column == "key" else None)
    for row in rows:
        table.add_row(
            *(Text(cell) for cell in (row.key, row.type, row.default, row.constraint)),
            _prose(row.description),
        )
    out.print(table)


@app.command("export")
@user_errors
def export_model(
    run_dir: Annotated[Path, typer.Argument(help="a run directory made by `crystalkit train`")],
    merge: Annotated[
        bool,
        typer.Option(
            help="a standalone model (LoRA merged into the base weights) loading as a run and, for "
            "Hugging Face backbones, by plain transformers"
        ),
    ] = False,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="output folder (default RUN_DIR/export)")
    ] = None,
) -> None:
    """Export a run's latest checkpoint: a standalone model (--merge), or a LoRA run's adapter."""
    from crystalkit.export import export_run

    target = export_run(run_dir, out_dir, merge)
    err.print(f"{'merged model' if merge else 'adapter'}: {target}", highlight=False)


@recipe_app.command("show")
@user_errors
def recipe_show(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Print the fully resolved recipe (inheritance, overrides and defaults applied)."""
    from crystalkit.config import load_recipe
    from crystalkit.config.loader import dump_recipe

    text = dump_recipe(load_recipe(recipe, overrides or []))
    out.print(text, end="", highlight=False, markup=False, soft_wrap=True)


@recipe_app.command("validate")
@user_errors
def recipe_validate(recipes: Annotated[list[Path], typer.Argument(help="recipe files")]) -> None:
    """Check recipes without running them (exit 2 on the first invalid one)."""
    from crystalkit.config import load_recipe

    for path in recipes:
        resolved = load_recipe(path)
        out.print(f"[green]ok[/] {path} ({resolved.name})", highlight=False)


@recipe_app.command("schema")
@user_errors
def recipe_schema(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write to a file")] = None,
) -> None:
    """Emit the recipe JSON Schema (for editor autocompletion and validation)."""
    from crystalkit.config.json_schema import recipe_json_schema
    from crystalkit.io import write_user_file

    text = json.dumps(recipe_json_schema(), indent=2)
    if output is None:
        out.print(text, highlight=False, markup=False, soft_wrap=True)
    else:
        write_user_file(output, (text + "\n").encode("utf-8"), "--output")


@ablate_app.callback()
@user_errors
def ablate(
    ctx: typer.Context,
    grid: Annotated[Path | None, typer.Option(help="grid YAML file (see docs: Ablations)")] = None,
    jobs: Annotated[
        int, typer.Option(min=1, help="cells trained in parallel (local launcher)")
    ] = 1,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="torch threads per cell whose recipe sets no train.num_threads (default: the "
            "available cores // --jobs)",
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="print the planned cells and exit")] = False,
    launcher: Annotated[
        str, typer.Option(help="local (processes on this machine) or submitit (job array)")
    ] = "local",
    cluster: Annotated[
        str | None, typer.Option(help="submitit cluster: slurm, local, debug (default: auto)")
    ] = None,
) -> None:
    """Train every unfinished cell of a grid, then write the aggregated report."""
    if ctx.invoked_subcommand is not None:
        return
    if grid is None:
        raise UsageError("ablate: pass --grid FILE (or `crystalkit ablate report GRID`)")
    if launcher not in ("local", "submitit"):
        raise UsageError(f"--launcher: expected local or submitit, got {launcher!r}")
    from crystalkit.ablation.grid import load_grid
    from crystalkit.ablation.report import write_report
    from crystalkit.ablation.runner import run_local, run_submitit

    loaded = load_grid(grid)
    if dry_run:
        from crystalkit.ablation.plan import plan_grid

        plan = plan_grid(loaded)
        title = f"{grid}: {len(plan.cells)} cells" + (
            f" after {len(plan.sources)} warm-start sources" if plan.sources else ""
        )
        table = Table(title=f"{title} -> {loaded.output_dir}")
        for column in ("cell", *plan.keys, "seed", "state"):
            table.add_column(escape(column))
        if plan.overrides:
            table.add_column("overrides", overflow="fold")
        for row in [*plan.sources, *plan.cells]:
            extra = [row.overrides] if plan.overrides else []
            table.add_row(
                row.id, *(escape(v) for v in [*row.values, str(row.seed), row.state, *extra])
            )
        out.print(table)
        return
    if launcher == "local":
        outcome = run_local(loaded, jobs, err, threads)
    else:
        outcome = run_submitit(loaded, cluster, err, threads=threads)
    err.print(
        f"{len(outcome.done)} cells trained, {len(outcome.skipped)} already done, "
        f"{len(outcome.failed)} failed"
    )
    for kind, path in write_report(loaded, out).items():
        err.print(f"{kind}: {path}")
    if outcome.failed:
        raise typer.Exit(1)


@ablate_app.command("report")
@user_errors
def ablate_report(
    grid: Annotated[Path, typer.Argument(help="grid YAML file", show_default=False)],
) -> None:
    """Aggregate a grid's finished cells: table, CSV, Markdown, LaTeX and a PNG chart."""
    from crystalkit.ablation.grid import load_grid
    from crystalkit.ablation.report import write_report

    for kind, path in write_report(load_grid(grid), out).items():
        err.print(f"{kind}: {path}")


def main() -> None:
    app()
