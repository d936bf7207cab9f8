"""Ablation grids: expansion properties, one-line errors, resumable local and submitit runs,
aggregated reports."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
import yaml
from cli_process import assert_one_error_line, invoke
from conftest import ROOT, TINY
from hypothesis import given, settings
from hypothesis import strategies as st

from crystalkit.ablation.grid import GridFile, cell_id, expand, load_grid
from crystalkit.ablation.runner import STATUS_FILE, cell_dir, cell_state, read_status, run_local
from crystalkit.errors import RecipeError

values = st.lists(
    st.one_of(st.integers(-3, 3), st.sampled_from(["a", "b", "c"])),
    min_size=1,
    max_size=3,
    unique=True,
)
grids = st.dictionaries(st.sampled_from(["x.a", "x.b", "y.c", "z"]), values, max_size=3)


@settings(max_examples=80, deadline=None)
@given(grid=grids, seeds=st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True))
def test_expansion_is_the_cartesian_product_with_unique_stable_ids(grid, seeds):
    spec = GridFile(base="r.yaml", grid=grid, seeds=seeds)
    cells = expand(spec)
    expected = len(seeds)
    for options in grid.values():
        expected *= len(options)
    assert len(cells) == expected
    assert len({c.id for c in cells}) == len(cells)
    assert [c.id for c in expand(spec)] == [c.id for c in cells]  # deterministic
    # ids depend on the resolved overrides only: reversing keys and value lists changes nothing
    reversed_spec = GridFile(
        base="r.yaml", grid={k: v[::-1] for k, v in reversed(grid.items())}, seeds=seeds[::-1]
    )
    assert {c.id for c in expand(reversed_spec)} == {c.id for c in cells}
    for cell in cells:
        assert set(cell.values) == set(grid)


@settings(max_examples=40, deadline=None)
@given(grid=grids, seeds=st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True))
def test_seed_keys_set_every_cell_and_source_to_its_seed(grid, seeds):
    plain = expand(GridFile(base="r.yaml", grid=grid, seeds=seeds))
    spec = GridFile(base="r.yaml", grid=grid, seeds=seeds, seed_keys=["seed", "dataset.seed"])
    both = expand(spec)
    assert [c.seed for c in both] == [c.seed for c in plain]
    for cell, before in zip(both, plain, strict=True):
        assert cell.overrides == (*before.overrides, f"dataset.seed={cell.seed}")
    assert not {c.id for c in both} & {c.id for c in plain}  # other items: other runs


def test_seed_keys_refuse_repeats_and_a_varied_key():
    with pytest.raises(ValueError, match="each key once; seed repeats"):
        GridFile(base="r.yaml", seed_keys=["seed", "seed"])
    with pytest.raises(ValueError, match=r"seed_keys: dataset\.seed is varied too"):
        GridFile(base="r.yaml", grid={"dataset.seed": [0, 1]}, seed_keys=["seed", "dataset.seed"])


@settings(max_examples=60, deadline=None)
@given(grid=grids.filter(bool), data=st.data())
def test_exclude_removes_exactly_the_matching_cells(grid, data):
    key = data.draw(st.sampled_from(sorted(grid)))
    value = data.draw(st.sampled_from(grid[key]))
    full = expand(GridFile(base="r.yaml", grid=grid))
    kept = expand(GridFile(base="r.yaml", grid=grid, exclude=[{key: value}]))
    assert [c.id for c in kept] == [c.id for c in full if c.values[key] != value]


def test_zip_varies_keys_together_and_cells_add_overrides():
    spec = GridFile(
        base="r.yaml",
        grid={"corruption.name": ["blur", "mask"]},
        zip=[{"latents.family": ["token", "recurrent"], "latents.schedule.k": [8, 4]}],
        cells=[{"match": {"corruption.name": "mask"}, "overrides": ["corruption.fraction=0.75"]}],
    )
    cells = expand(spec)
    assert len(cells) == 4
    assert {(c.values["latents.family"], c.values["latents.schedule.k"]) for c in cells} == {
        ("token", 8),
        ("recurrent", 4),
    }
    masked = [c for c in cells if c.values["corruption.name"] == "mask"]
    assert all("corruption.fraction=0.75" in c.overrides for c in masked)
    assert cell_id(["a=1", "b=2"]) == cell_id(["b=2", "a=1"]) != cell_id(["a=1", "b=3"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("base: r.yaml\ngrd: {}\n", "grd: unknown key (did you mean 'grid'?)"),
        (
            "base: r.yaml\ngrid: {train.lr: []}\n",
            "grid: train.lr: needs at least one value",
        ),
        (
            "base: r.yaml\nzip: [{a: [1, 2], b: [1]}]\n",
            "zip: group 0: needs keys with equal",
        ),
        (
            "base: r.yaml\ngrid: {a: [1]}\nexclude: [{b: 1}]\n",
            "exclude names keys the grid does not vary: b",
        ),
        (
            "base: r.yaml\nvariants: {x: []}\ncompare: {arm: x}\n",
            "compare names keys the grid does not vary: arm (the variants' axis is 'variant')",
        ),
        (
            "base: r.yaml\nwarm_start: {base: none.yaml}\n",
            "warm_start.base: recipe 'none.yaml' not found",
        ),
        ("base: r.yaml\nvariants: {x: [lr]}\n", "expected KEY=VALUE"),
        (
            "base: r.yaml\nvariants: {x: []}\ncompare: {variant: y}\n",
            "compare: variant='y' is not one of the grid's values (x)",
        ),
        ("base: r.yaml\nseeds: []\n", "seeds: List should have at least 1 item"),
        ("base: missing.yaml\n", "base: recipe 'missing.yaml' not found"),
        ("base: r.yaml\noverrides: [train.lr]\n", "expected KEY=VALUE"),
    ],
)
def test_bad_grid_files_are_one_line_errors(tmp_path: Path, text: str, expected: str):
    (tmp_path / "r.yaml").write_text("name: r\n")
    bad = tmp_path / "grid.yaml"
    bad.write_text(text)
    line = assert_one_error_line(invoke("ablate", "--grid", bad, "--dry-run"))
    assert str(bad) in line and expected in line, line


def test_a_bad_cell_value_names_the_cell(tmp_path: Path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"base: {ROOT / 'recipes' / 'crystal_scratch.yaml'}\ngrid: {{corruption.name: [blur, blurr]}}\n"
    )
    line = assert_one_error_line(invoke("ablate", "--grid", grid, "--dry-run"))
    assert "cell corruption.name=blurr (seed 0)" in line and "unknown corruption 'blurr'" in line


def _tiny_grid(tmp_path: Path, **extra) -> Path:
    spec = {
        "base": str(ROOT / "recipes" / "direct_finetune.yaml"),
        "overrides": [*TINY, "train.steps=4", "eval.max_samples=16"],
        "grid": {"train.lr": [0.001, 0.003]},
        "seeds": [0, 1],
        "output_dir": "out",
        **extra,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_grid_runs_resumes_only_unfinished_cells_and_reports(tmp_path: Path):
    path = _tiny_grid(tmp_path)
    dry = invoke("ablate", "--grid", path, "--dry-run")
    assert dry.exit_code == 0 and dry.stdout.count("pending") == 4
    assert "overrides" not in dry.stdout  # no cells: rules, no column

    result = invoke("ablate", "--grid", path, "--jobs", "2")
    assert result.exit_code == 0, result.output
    grid = load_grid(path)
    cells = grid.cells()
    assert all(cell_state(cell_dir(grid, c)) == "done" for c in cells)
    assert "4 cells trained, 0 already done, 0 failed" in " ".join(result.output.split())

    # a second invocation does no work
    again = invoke("ablate", "--grid", path, "--jobs", "2")
    assert "0 cells trained, 4 already done" in " ".join(again.output.split())

    # a cell whose process died mid-run (status 'running', dead pid, no results) is the only rerun
    victim = cell_dir(grid, cells[1])
    status = read_status(victim)
    (victim / "results.json").unlink()
    (victim / STATUS_FILE).write_text(json.dumps(status | {"state": "running", "pid": 2**22 + 7}))
    assert cell_state(victim) == "failed"
    rerun = invoke("ablate", "--grid", path)
    assert "1 cells trained, 3 already done" in " ".join(rerun.output.split())
    assert read_status(victim)["attempts"] == 2
    assert all(read_status(cell_dir(grid, c))["attempts"] == 1 for c in cells if c != cells[1])

    out = tmp_path / "out"
    with (out / "report.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["train.lr"] for r in sorted(rows, key=lambda r: r["train.lr"])] == ["0.001", "0.003"]
    assert all(r["seeds"] == "2" and r["finished"] == "2" for r in rows)
    accuracies = [
        json.loads((cell_dir(grid, c) / "results.json").read_text())["accuracy"] for c in cells
    ]
    means = sorted(float(r["accuracy_mean"]) for r in rows)
    assert means == pytest.approx(
        sorted([(accuracies[0] + accuracies[1]) / 2, (accuracies[2] + accuracies[3]) / 2])
    )
    assert (out / "report.md").read_text().startswith("| train.lr | seeds | accuracy (%)")
    assert "\\toprule" in (out / "report.tex").read_text()
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_cells_do_not_stop_the_others_and_are_retried(tmp_path: Path):
    from rich.console import Console

    # image size 24 is a valid recipe value but not a multiple of the encoder stride: the cell
    # fails when its model is built, inside its own process
    path = _tiny_grid(tmp_path, grid={"backbone.image_size": [32, 24]}, seeds=[0])
    grid = load_grid(path)
    good, bad = grid.cells()
    log = Console(file=io.StringIO())
    outcome = run_local(grid, jobs=2, console=log)
    assert [c.id for c in outcome.done] == [good.id] and [c.id for c in outcome.failed] == [bad.id]
    status = read_status(cell_dir(grid, bad))
    assert status["state"] == "failed" and "not a multiple of feature_stride" in status["error"]
    assert "Traceback" in (cell_dir(grid, bad) / "train.log").read_text()
    again = run_local(grid, jobs=2, console=log)  # retried, the finished one skipped
    assert [c.id for c in again.failed] == [bad.id] and [c.id for c in again.skipped] == [good.id]
    assert read_status(cell_dir(grid, bad))["attempts"] == 2


def test_submitit_launcher_runs_cells_with_the_local_executor(tmp_path: Path):
    from rich.console import Console

    from crystalkit.ablation.runner import run_submitit

    path = _tiny_grid(tmp_path, grid={"train.lr": [0.002]}, seeds=[0])
    grid = load_grid(path)
    with (tmp_path / "log.txt").open("w") as log:
        outcome = run_submitit(grid, "local", Console(file=log))
    assert len(outcome.done) == 1 and not outcome.failed
    assert cell_state(cell_dir(grid, grid.cells()[0])) == "done"


def test_shipped_grids_expand_and_validate():
    for path in sorted((ROOT / "ablations").glob("*.yaml")):
        grid = load_grid(path)
        cells = grid.cells()
        assert cells, path
        for cell in cells:
            grid.recipe(cell)
        # the header says how long the grid takes
        assert re.search(r"about \d+ (minutes|hours)", path.read_text()[:600]), path


def test_grid_errors_are_recipe_errors(tmp_path):
    with pytest.raises(RecipeError):
        bad = tmp_path / "g.yaml"
        bad.write_text("- not a mapping\n")
        load_grid(bad)


def test_report_of_an_unrun_grid_with_mapping_values(tmp_path: Path):
    from rich.console import Console

    from crystalkit.ablation.report import aggregate, write_report

    path = _tiny_grid(tmp_path, grid={"objectives": [{}, {"kl": {"fraction": 1.0}}]}, seeds=[0, 1])
    grid = load_grid(path)
    rows, names = aggregate(grid)
    assert [r.values["objectives"] for r in rows] == [{}, {"kl": {"fraction": 1.0}}]
    assert all(r.seeds == 2 and r.finished == 0 for r in rows) and names == ["accuracy"]
    paths = write_report(grid, Console(file=io.StringIO()))
    assert '{"kl":{"fraction":1.0}}' in paths["md"].read_text()
    assert "overrides" not in paths["md"].read_text()  # no cells: rules, no column
    assert r"\{" in paths["tex"].read_text()  # the mapping's braces are printed, not grouping


def test_variants_are_an_axis_of_named_override_lists():
    spec = GridFile(
        base="r.yaml",
        grid={"train.lr": [0.1, 0.2]},
        variants={"ft": ["method=finetune", "latents.schedule.k=0"], "crystal": []},
        cells=[{"match": {"variant": "crystal"}, "overrides": ["train.steps=3"]}],
        exclude=[{"variant": "ft", "train.lr": 0.2}],
    )
    cells = expand(spec)
    assert [(c.values["train.lr"], c.values["variant"]) for c in cells] == [
        (0.1, "ft"),
        (0.1, "crystal"),
        (0.2, "crystal"),
    ]
    assert cells[0].overrides == (
        "train.lr=0.1",
        "method=finetune",
        "latents.schedule.k=0",
        "seed=0",
    )
    assert cells[1].overrides == ("train.lr=0.1", "train.steps=3", "seed=0")
    assert cells[0].label() == "train.lr=0.1, variant=ft"


def test_cell_ids_of_digits_only_name_their_runs(tmp_path: Path):
    """A hash may come out as digits only; the run name must stay a string."""
    path = _tiny_grid(tmp_path)
    grid = load_grid(path)
    cell = grid.cells()[0]

    class DigitCell(type(cell)):
        @property
        def id(self) -> str:
            return "0123456789"

    recipe = grid.recipe(DigitCell(cell.assignment, cell.seed, cell.overrides))
    assert recipe.name == "0123456789"


def test_a_warm_started_grid_trains_one_source_per_seed_first(tmp_path: Path):
    from rich.console import Console

    path = _tiny_grid(
        tmp_path,
        grid={},
        variants={"ft": ["train.lr=0.001"], "crystal": ["method=crystal", "latents.schedule.k=2"]},
        warm_start={"base": str(ROOT / "recipes" / "direct_finetune.yaml"), "overrides": TINY},
        compare={"variant": "ft"},
        collapse_below=0.3,
    )
    grid = load_grid(path)
    sources = grid.sources()
    assert [s.seed for s in sources] == [0, 1] and all(s.id.startswith("source-") for s in sources)
    for cell in grid.cells():
        source = cell_dir(grid, grid.source_of(cell.seed))
        assert f'warm_start.source="{source}"' in cell.overrides
    dry = invoke("ablate", "--grid", path, "--dry-run")
    assert dry.exit_code == 0 and dry.stdout.count("pending") == 6  # 2 sources + 4 cells
    outcome = run_local(grid, jobs=2, console=Console(file=io.StringIO()))
    assert len(outcome.done) == 6 and not outcome.failed
    for cell in grid.cells():
        results = json.loads((cell_dir(grid, cell) / "results.json").read_text())
        source = cell_dir(grid, grid.source_of(cell.seed)).resolve()
        assert results["warm_start"]["source"] == str(source)
    # the report pairs every row with the compared one, seed by seed
    from crystalkit.ablation.report import aggregate, write_report

    rows, _ = aggregate(grid)
    by_variant = {r.values["variant"]: r for r in rows}
    expected = [
        100
        * (by_variant["crystal"].by_seed["accuracy"][s] - by_variant["ft"].by_seed["accuracy"][s])
        for s in (0, 1)
    ]
    paths = write_report(grid, Console(file=io.StringIO()))
    markdown = paths["md"].read_text()
    assert "Δ paired" in markdown and "95% PI" in markdown and "(reference)" in markdown
    assert " ".join(f"{d:+.1f}" for d in expected) in markdown
    seeds = list(csv.DictReader(paths["seeds"].open()))
    assert len(seeds) == 4 and {r["seed"] for r in seeds} == {"0", "1"}


def test_a_failed_source_fails_its_seeds_cells_only(tmp_path: Path):
    from rich.console import Console

    path = _tiny_grid(
        tmp_path,
        grid={},
        variants={"ft": []},
        # seed 1's source asks for an image size the encoder stride does not divide
        warm_start={
            "base": str(ROOT / "recipes" / "direct_finetune.yaml"),
            "overrides": [*TINY, "backbone.image_size=24"],
        },
        seeds=[0],
    )
    grid = load_grid(path)
    outcome = run_local(grid, jobs=1, console=Console(file=io.StringIO()))
    assert len(outcome.failed) == 2 and not outcome.done
    (cell,) = grid.cells()
    assert "warm-start source of seed 0 failed" in read_status(cell_dir(grid, cell))["error"]


def test_grids_vary_a_stages_keys_by_its_name():
    from crystalkit.ablation.grid import Grid

    recipes = ROOT / "recipes"
    spec = GridFile(base="instruct.yaml", grid={"stages.finetune.train.lr": [1e-3, 5e-4]})
    grid = Grid(recipes / "grid.yaml", spec)
    assert [grid.recipe(cell).stages[-1].train.lr for cell in grid.cells()] == [1e-3, 5e-4]


def test_paired_differences_pair_rows_at_the_same_values_of_the_other_keys(tmp_path: Path):
    """With lr x variant, each variant row is compared with the reference variant at its own lr,
    seed by seed (fake finished cells: only results.json and status.json are read)."""
    from crystalkit.ablation.report import aggregate, seed_statistics

    (tmp_path / "r.yaml").write_text("name: r\n")
    spec = {
        "base": "r.yaml",
        "grid": {"train.lr": [0.1, 0.2]},
        "variants": {"ref": [], "new": ["train.steps=2"]},
        "seeds": [0, 1],
        "compare": {"variant": "ref"},
        "output_dir": "out",
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    grid = load_grid(path)
    accuracy = {
        (0.1, "ref"): [0.5, 0.6],
        (0.1, "new"): [0.7, 0.5],
        (0.2, "ref"): [0.2, 0.2],
        (0.2, "new"): [0.3, 0.4],
    }
    for cell in grid.cells():
        directory = cell_dir(grid, cell)
        directory.mkdir(parents=True)
        value = accuracy[(cell.values["train.lr"], cell.values["variant"])][cell.seed]
        (directory / "results.json").write_text(json.dumps({"accuracy": value}))
        (directory / STATUS_FILE).write_text(json.dumps({"state": "done"}))
    rows, _ = aggregate(grid)
    extras = seed_statistics(grid, rows)
    by_values = {
        (r.values["train.lr"], r.values["variant"]): extras.cells[i] for i, r in enumerate(rows)
    }
    assert by_values[(0.1, "new")][-1] == "+20.0 -10.0"
    assert by_values[(0.2, "new")][-1] == "+10.0 +20.0"
    assert by_values[(0.1, "ref")][-3] == "(reference)"


def test_cells_overrides_show_in_the_dry_run_and_the_reports(tmp_path: Path):
    """Two grid points whose difference includes a ``cells:`` override: the dry run and every
    report name it on the matching cell only (fake finished cells: only results.json and
    status.json are read)."""
    from rich.console import Console

    from crystalkit.ablation.report import write_report

    rules = [
        {"match": {"train.lr": 0.003}, "overrides": ["train.steps=2"]},
        {"match": {"train.lr": 0.001}, "overrides": []},
    ]
    path = _tiny_grid(tmp_path, cells=rules)
    grid = load_grid(path)
    cells = grid.cells()
    expected = {0.001: "", 0.003: "train.steps=2"}
    assert {c.values["train.lr"]: grid.extra_overrides(c) for c in cells} == {
        0.001: (),
        0.003: ("train.steps=2",),
    }

    dry = invoke("ablate", "--grid", path, "--dry-run")
    assert dry.exit_code == 0, dry.output
    lines = dry.stdout.splitlines()
    assert any("overrides" in line and "state" in line for line in lines), dry.stdout
    for cell in cells:
        (line,) = [line for line in lines if cell.id in line]
        assert ("train.steps=2" in line) == (cell.values["train.lr"] == 0.003), line

    for cell in cells:
        directory = cell_dir(grid, cell)
        directory.mkdir(parents=True)
        accuracy = 0.5 + 0.1 * cell.seed + (0.2 if cell.values["train.lr"] == 0.003 else 0.0)
        (directory / "results.json").write_text(json.dumps({"accuracy": accuracy}))
        (directory / STATUS_FILE).write_text(json.dumps({"state": "done"}))
    paths = write_report(grid, Console(file=io.StringIO()))

    # CSV: the existing columns first, in their order, the overrides appended
    with paths["csv"].open() as handle:
        header = next(csv.reader(handle))
        handle.seek(0)
        rows = list(csv.DictReader(handle))
    assert header == ["train.lr", "seeds", "finished", "accuracy_mean", "accuracy_std", "overrides"]
    assert {r["train.lr"]: r["overrides"] for r in rows} == {str(k): v for k, v in expected.items()}
    seeds = list(csv.DictReader(paths["seeds"].open()))
    assert len(seeds) == 4
    assert all(r["overrides"] == expected[float(r["train.lr"])] for r in seeds)

    # Markdown and LaTeX: the column last, filled on the matching row only
    markdown = paths["md"].read_text().splitlines()
    assert markdown[0].startswith("| train.lr | seeds | accuracy (%) | 95% PI |")
    assert markdown[0].endswith("| overrides |")
    by_lr = {line.split(" | ")[0].removeprefix("| "): line for line in markdown[2:]}
    assert by_lr["0.003"].endswith("| train.steps=2 |") and by_lr["0.001"].endswith("|  |")
    tex = paths["tex"].read_text()
    assert r"\begin{tabular}{lrrrl}" in tex and "train.steps=2" in tex


def test_an_explicit_thread_count_survives_a_grid_and_threads_sets_the_others(tmp_path: Path):
    """A cell whose recipe sets train.num_threads keeps it whatever --jobs / --threads say; the
    other cells take --threads (default: the available cores // --jobs)."""
    path = _tiny_grid(tmp_path, grid={"train.num_threads": [1, None]}, seeds=[0])
    result = invoke("ablate", "--grid", path, "--jobs", "1", "--threads", "2")
    assert result.exit_code == 0, result.output
    grid = load_grid(path)
    used = {
        cell.values["train.num_threads"]: json.loads(
            (cell_dir(grid, cell) / "results.json").read_text()
        )["num_threads"]
        for cell in grid.cells()
    }
    assert used == {1: 1, None: 2}


CHANGING = '''
import torch


class Dim:
    """A corruption whose code the test edits between two ablate invocations."""

    def __call__(self, images, generator):
        return images * 0.5
'''


def test_a_cell_whose_plugin_code_changed_trains_again(tmp_path: Path):
    plugin = tmp_path / "dim.py"
    plugin.write_text(CHANGING)
    path = _tiny_grid(
        tmp_path,
        grid={"train.lr": [0.001]},
        seeds=[0],
        overrides=[
            *TINY, "train.steps=2", "eval.max_samples=8", "method=crystal",
            "latents.schedule.k=2", f"corruption.name={plugin}:Dim",
        ],
    )  # fmt: skip
    assert invoke("ablate", "--grid", path).exit_code == 0
    grid = load_grid(path)
    (cell,) = grid.cells()
    first = json.loads((cell_dir(grid, cell) / "components.json").read_text())["corruption"]
    assert cell_state(cell_dir(grid, cell)) == "done"
    plugin.write_text(CHANGING.replace("0.5", "0.25"))
    assert cell_state(cell_dir(grid, cell)) == "code changed"
    dry = invoke("ablate", "--grid", path, "--dry-run")
    assert "code changed" in dry.stdout
    again = invoke("ablate", "--grid", path)
    assert again.exit_code == 0, again.output
    said = " ".join(again.output.split())
    assert "1 cells trained, 0 already done" in said
    assert "code changed: trains from the start" in said
    second = json.loads((cell_dir(grid, cell) / "components.json").read_text())["corruption"]
    assert second["code"] != first["code"] and cell_state(cell_dir(grid, cell)) == "done"
    log = (cell_dir(grid, cell) / "train.log").read_text()
    assert "resuming" not in log.split("--- attempt 2")[1]  # from the start, not resumed


def test_reports_show_per_bucket_accuracy_and_rank_on_a_bucket(tmp_path: Path):
    """Per-bucket accuracies are report columns (``area <label>``) and a ranking metric whose
    label holds dots; a cell whose results.json predates buckets still reports, without them
    (fake finished cells: only results.json and status.json are read)."""
    from rich.console import Console

    from crystalkit.ablation.report import write_report

    (tmp_path / "r.yaml").write_text("name: r\n")
    spec = {
        "base": "r.yaml",
        "variants": {"old": [], "small": ["train.steps=2"], "large": ["train.steps=3"]},
        "metric": {"name": "per_bucket.0.5-5%", "mode": "max"},
        "output_dir": "out",
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    grid = load_grid(path)
    buckets = {
        "small": {"<0.5%": 0.9, "0.5-5%": 0.2, ">=5%": 0.3},
        "large": {"<0.5%": 0.1, "0.5-5%": 0.8, ">=5%": 0.7},
    }
    for cell in grid.cells():
        directory = cell_dir(grid, cell)
        directory.mkdir(parents=True)
        results: dict = {"accuracy": 0.5, "per_category": {"count": 0.4}}
        if cell.values["variant"] != "old":
            results["per_bucket"] = buckets[cell.values["variant"]]
        (directory / "results.json").write_text(json.dumps(results))
        (directory / STATUS_FILE).write_text(json.dumps({"state": "done"}))
    printed = io.StringIO()
    write_report(grid, Console(file=printed, width=250))
    assert "area <0.5% (%)" in printed.getvalue() and "area >=5% (%)" in printed.getvalue()

    rows = list(csv.DictReader((tmp_path / "out" / "report.csv").open()))
    assert [r["variant"] for r in rows] == ["large", "small", "old"]  # ranked on 0.5-5 %
    assert [r["per_bucket.<0.5%_mean"] for r in rows] == ["0.1", "0.9", ""]
    markdown = (tmp_path / "out" / "report.md").read_text().splitlines()
    assert markdown[0].startswith("| variant | seeds | area 0.5-5% (%) | 95% PI | accuracy (%) |")
    assert "| area <0.5% (%) | area >=5% (%) |" in markdown[0]
    assert markdown[-1].startswith("| old | 1/1 | — |")
    tex = (tmp_path / "out" / "report.tex").read_text()
    assert r"area \textless{}0.5\% (\%)" in tex and r"area \textgreater{}=5\%" in tex
