"""``file.py:attr`` names resolve like ``inherit``: against the file that names them (an override:
the working directory; a grid: the grid's folder), and a resolved recipe stores them absolute."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from crystalkit.ablation.grid import load_grid
from crystalkit.config.loader import dump_recipe, load_recipe
from crystalkit.config.names import anchor_name
from crystalkit.errors import RecipeError

CORRUPTION = '''
import torch


class Darken:
    """Scale every pixel by a constant factor."""

    def __init__(self, factor: float = 0.5):
        self.factor = factor

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return images * self.factor
'''

OBJECTIVE = '''
import torch


class LogitL2:
    """Mean squared difference of the two paths' answer logits."""

    attention_layers = ()
    needs_hidden = False

    def __call__(self, outputs) -> torch.Tensor:
        mask = outputs.answer_mask
        diff = outputs.intact_logits.detach() - outputs.corrupted_logits
        return (diff[mask] ** 2).mean()
'''


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """``project/plugins/{darken,l2}.py``, ``project/recipes/base.yaml`` naming them relatively,
    and ``project/recipes/child/run.yaml`` inheriting it."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "darken.py").write_text(CORRUPTION)
    (tmp_path / "plugins" / "l2.py").write_text(OBJECTIVE)
    recipes = tmp_path / "recipes"
    (recipes / "child").mkdir(parents=True)
    (recipes / "base.yaml").write_text(
        yaml.safe_dump(
            {
                "method": "crystal",
                "corruption": {"name": "../plugins/darken.py:Darken", "factor": 0.25},
                "objectives": {"../plugins/l2.py:LogitL2": {"weight": 0.5}},
            }
        )
    )
    (recipes / "child" / "run.yaml").write_text("inherit: ../base.yaml\n")
    return tmp_path


def test_relative_file_names_resolve_against_the_naming_file_from_any_directory(
    project: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    recipe = load_recipe(project / "recipes" / "child" / "run.yaml")
    assert recipe.corruption.name == f"{project / 'plugins' / 'darken.py'}:Darken"
    assert recipe.corruption.params == {"factor": 0.25}
    (objective,) = recipe.objectives.values()
    assert objective.name == f"{project / 'plugins' / 'l2.py'}:LogitL2"


def test_saved_recipe_holds_absolute_names_and_loads_from_anywhere(
    project: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
):
    recipe = load_recipe(project / "recipes" / "base.yaml")
    saved = tmp_path_factory.mktemp("run") / "recipe.yaml"
    saved.write_text(dump_recipe(recipe))
    monkeypatch.chdir(tmp_path_factory.mktemp("other"))
    again = load_recipe(saved)
    assert again.corruption == recipe.corruption
    assert again.objectives == recipe.objectives


def test_an_override_names_a_file_relative_to_the_working_directory(
    project: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(project / "plugins")
    recipe = load_recipe(project / "recipes" / "base.yaml", ["corruption.name=darken.py:Darken"])
    assert recipe.corruption.name == f"{project / 'plugins' / 'darken.py'}:Darken"
    assert recipe.corruption.params == {"factor": 0.25}  # same component: parameters kept
    anchored = load_recipe(
        project / "recipes" / "base.yaml",
        ["corruption={name: plugins/darken.py:Darken}"],
        anchor=project,
    )
    assert anchored.corruption.name == recipe.corruption.name


def test_a_missing_relative_file_names_where_it_was_looked_for(project: Path):
    recipe = project / "recipes" / "missing.yaml"
    recipe.write_text("corruption: {name: ../plugins/nope.py:Nope}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    assert str(project / "plugins" / "nope.py") in str(info.value)
    assert "\n" not in str(info.value)


def test_grid_values_resolve_against_the_grid_file(
    project: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
):
    grid = project / "grids" / "g.yaml"
    grid.parent.mkdir()
    grid.write_text(
        yaml.safe_dump(
            {
                "base": "../recipes/base.yaml",
                "grid": {"corruption.name": ["none", "../plugins/darken.py:Darken"]},
                "seeds": [0],
            }
        )
    )
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    loaded = load_grid(grid)
    names = [loaded.recipe(cell).corruption.name for cell in loaded.cells()]
    assert names == ["none", f"{project / 'plugins' / 'darken.py'}:Darken"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("blur", "blur"),
        ("pkg.module:Attr", "pkg.module:Attr"),
        ("/abs/x.py:A", "/abs/x.py:A"),
        ("x.py:A.B", "/base/x.py:A.B"),
        ("../up/x.py:A", "/up/x.py:A"),
    ],
)
def test_anchor_name(name: str, expected: str):
    assert anchor_name(name, Path("/base")) == expected
