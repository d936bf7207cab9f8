"""Recipes: inheritance, overrides, defaults, the shipped files, one-line error messages that say
where the bad value came from, YAML round-trips and the JSON Schema."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest

from crystalkit.config.json_schema import recipe_json_schema
from crystalkit.config.loader import dump_recipe, load_recipe
from crystalkit.config.schema import EvalConfig, Recipe, TrainConfig
from crystalkit.errors import RecipeError, UsageError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "recipes").rglob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def error_of(path: Path, overrides: Sequence[str] = ()) -> str:
    """The message of the RecipeError loading ``path`` raises; it must be a single line."""
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.strip() == message
    return message


# -- inheritance ------------------------------------------------------------------------------


def test_child_overrides_base_and_nested_sections_merge(tmp_path: Path):
    write(
        tmp_path / "base.yaml",
        """
        seed: 3
        description: base
        train: {steps: 10, lr: 0.1, batch_size: 4}
        backbone: {name: embedded, hidden_size: 64, num_layers: 2}
        """,
    )
    child = write(
        tmp_path / "child.yaml",
        """
        inherit: base.yaml
        description: child
        train: {steps: 20}
        backbone: {hidden_size: 32}
        """,
    )
    recipe = load_recipe(child)
    assert recipe.description == "child"
    assert recipe.seed == 3
    assert (recipe.train.steps, recipe.train.lr, recipe.train.batch_size) == (20, 0.1, 4)
    assert recipe.backbone.name == "embedded"
    assert recipe.backbone.params["hidden_size"] == 32
    assert recipe.backbone.params["num_layers"] == 2


def test_list_of_parents_later_wins_and_child_wins_over_all(tmp_path: Path):
    write(tmp_path / "a.yaml", "seed: 1\ntrain: {steps: 11, lr: 0.1}\n")
    write(tmp_path / "b.yaml", "seed: 2\ntrain: {steps: 22}\n")
    child = write(tmp_path / "c.yaml", "inherit: [a.yaml, b.yaml]\ntrain: {batch_size: 5}\n")
    recipe = load_recipe(child)
    assert recipe.seed == 2
    assert (recipe.train.steps, recipe.train.lr, recipe.train.batch_size) == (22, 0.1, 5)


def test_inherit_paths_are_relative_to_each_recipe_file(tmp_path: Path, monkeypatch):
    write(tmp_path / "bases" / "root.yaml", "seed: 7\neval: {max_samples: 9}\n")
    write(tmp_path / "bases" / "mid.yaml", "inherit: root.yaml\ntrain: {steps: 12}\n")
    child = write(tmp_path / "exp" / "deep" / "child.yaml", "inherit: ../../bases/mid.yaml\n")
    monkeypatch.chdir(tmp_path / "exp")  # not where any of the files are
    recipe = load_recipe(Path("deep/child.yaml"))
    assert (recipe.seed, recipe.train.steps, recipe.eval.max_samples) == (7, 12, 9)
    assert recipe.name == "child"
    assert load_recipe(child) == recipe


def test_diamond_inheritance_is_not_a_cycle(tmp_path: Path):
    write(tmp_path / "d.yaml", "seed: 4\n")
    write(tmp_path / "b.yaml", "inherit: d.yaml\ntrain: {steps: 2}\n")
    write(tmp_path / "c.yaml", "inherit: d.yaml\neval: {batch_size: 3}\n")
    recipe = load_recipe(write(tmp_path / "a.yaml", "inherit: [b.yaml, c.yaml]\n"))
    assert (recipe.seed, recipe.train.steps, recipe.eval.batch_size) == (4, 2, 3)


def test_inherit_cycles_are_detected(tmp_path: Path):
    write(tmp_path / "a.yaml", "inherit: b.yaml\n")
    write(tmp_path / "b.yaml", "inherit: sub/../a.yaml\n")
    (tmp_path / "sub").mkdir()
    message = error_of(tmp_path / "a.yaml")
    assert "inherit cycle" in message
    assert message.count("a.yaml") >= 3 and "b.yaml" in message
    assert "inherit cycle" in error_of(write(tmp_path / "self.yaml", "inherit: self.yaml\n"))


def test_overrides_apply_after_inheritance(tmp_path: Path):
    write(tmp_path / "base.yaml", "train: {steps: 10, lr: 0.1}\nbackbone: {name: embedded}\n")
    child = write(tmp_path / "child.yaml", "inherit: base.yaml\ntrain: {steps: 20}\n")
    recipe = load_recipe(
        child, ["train.steps=5", "~train.lr", "train.betas=[0.8, 0.9]", "backbone.num_heads=2"]
    )
    assert recipe.train.steps == 5
    assert recipe.train.lr == TrainConfig().lr  # removing an inherited key restores the default
    assert recipe.train.betas == (0.8, 0.9)
    assert recipe.backbone.params["num_heads"] == 2
    assert load_recipe(child, ["train.lr=3e-4"]).train.lr == pytest.approx(3e-4)


def test_defaults_fill_everything_and_name_defaults_to_the_file_stem(tmp_path: Path):
    for text in ("", "seed: 0\n", "inherit: []\n"):
        recipe = load_recipe(write(tmp_path / "my_experiment.yaml", text))
        assert recipe.name == "my_experiment"
        assert recipe.train == TrainConfig()
        assert recipe.eval == EvalConfig()
        assert recipe.backbone.name == "embedded"
        assert recipe.dataset.name == "synthetic_shapes"
        assert recipe.backbone.params["hidden_size"] == 128  # component defaults too
        assert recipe.dataset.params  # the dataset's own defaults are filled in
    named = write(tmp_path / "file_stem.yaml", "name: explicit\n")
    assert load_recipe(named).name == "explicit"
    assert load_recipe(named, ["name=from_cli"]).name == "from_cli"


# -- shipped recipes --------------------------------------------------------------------------


def test_recipes_are_shipped():
    assert {p.name for p in SHIPPED} >= {
        "direct_finetune.yaml",
        "crystal_scratch.yaml",
        "crystal_default.yaml",
    }


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipe_validates(path: Path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert recipe.description
    assert recipe.train.steps >= 1


def test_crystal_scratch_inherits_direct_finetune():
    base = load_recipe(ROOT / "recipes" / "direct_finetune.yaml")
    derived = load_recipe(ROOT / "recipes" / "crystal_scratch.yaml")
    assert derived.name == "crystal_scratch" and derived.stages == []
    assert derived.eval == base.eval
    assert derived.train.model_copy(update={"steps": base.train.steps}) == base.train
    assert (derived.method, base.method) == ("crystal", "finetune")
    assert derived.corruption == base.corruption
    assert derived.backbone == base.backbone
    assert derived.dataset == base.dataset


def test_the_main_job_runs_the_crystal_scratch_configuration_on_the_testbed_from_the_instruct_model():
    scratch = load_recipe(ROOT / "recipes" / "crystal_scratch.yaml")
    testbed = load_recipe(ROOT / "recipes" / "testbed.yaml")
    instruct = load_recipe(ROOT / "recipes" / "instruct.yaml")
    default = load_recipe(ROOT / "recipes" / "crystal_default.yaml")
    assert default.stages == [] and default.method == "crystal"
    assert default.warm_start.source == "checkpoints/instruct"
    assert default.latents == scratch.latents and default.crystal == scratch.crystal
    # CrystaL as released: the attention term is logged but trains nothing
    released = scratch.objectives | {
        "attention": scratch.objectives["attention"].model_copy(update={"gradient": False})
    }
    assert default.objectives == released
    # the testbed's data, model and prompt: those the instruct model was trained on
    for recipe in (default, instruct):
        assert recipe.dataset == testbed.dataset and recipe.backbone == testbed.backbone
        assert recipe.prompt == testbed.prompt and recipe.prompt.question_first
    assert default.corruption.name == "evidence"
    assert (default.corruption.params["mode"], default.corruption.params["scope"]) == (
        "erase",
        "objects",
    )


# -- error messages ---------------------------------------------------------------------------


def test_unknown_key_names_path_suggestion_and_file(tmp_path: Path):
    path = write(tmp_path / "r.yaml", "train:\n  steps: 10\n  lrr: 0.1\n")
    message = error_of(path)
    assert message.startswith(f"{path}: train.lrr: unknown key")
    assert "(did you mean 'lr'?)" in message
    assert "valid keys here:" in message and "warmup_ratio" in message


def test_unknown_section_is_reported_at_the_top_level(tmp_path: Path):
    message = error_of(write(tmp_path / "r.yaml", "trian:\n  steps: 10\n"))
    assert "trian: unknown key (did you mean 'train'?)" in message
    assert "r.yaml" in message


def test_unknown_key_from_an_inherited_file_names_that_file(tmp_path: Path):
    base = write(tmp_path / "bases" / "base.yaml", "eval: {max_sample: 3}\n")
    child = write(tmp_path / "child.yaml", "inherit: bases/base.yaml\ntrain: {steps: 5}\n")
    message = error_of(child)
    assert message.startswith(f"{base}: eval.max_sample: unknown key")
    assert "(did you mean 'max_samples'?)" in message


def test_unknown_key_from_an_override_names_the_override(tmp_path: Path):
    path = write(tmp_path / "r.yaml", "seed: 1\n")
    message = error_of(path, ["train.stpes=3"])
    assert message.startswith("override 'train.stpes=3': train.stpes: unknown key")
    assert "(did you mean 'steps'?)" in message
    assert "override 'eval.foo.bar=1'" in error_of(path, ["eval.foo.bar=1"])


@pytest.mark.parametrize(
    ("text", "key", "bad", "expected"),
    [
        ("train: {steps: abc}\n", "train.steps", "'abc'", "integer"),
        ("train: {lr: fast}\n", "train.lr", "'fast'", "number"),
        ("train: {lr_schedule: cosin}\n", "train.lr_schedule", "'cosin'", "'cosine'"),
        ("train: {steps: 0}\n", "train.steps", "0", "greater than or equal to 1"),
        ("seed: [1, 2]\n", "seed", "[1, 2]", "integer"),
        ("eval: 3\n", "eval", "3", "dictionary"),
    ],
)
def test_wrong_type_names_path_value_and_expectation(tmp_path, text, key, bad, expected):
    path = write(tmp_path / "r.yaml", text)
    message = error_of(path)
    assert message.startswith(f"{path}: {key}: ")
    assert f"got {bad}" in message
    assert expected in message


def test_wrong_type_from_an_override_names_the_override(tmp_path: Path):
    message = error_of(write(tmp_path / "r.yaml", "train: {steps: 3}\n"), ["train.steps=many"])
    assert message.startswith("override 'train.steps=many': train.steps: ")
    assert "got 'many'" in message


def test_unknown_component_name_suggests_and_lists_valid(tmp_path: Path):
    path = write(tmp_path / "r.yaml", "backbone: {name: embeded}\n")
    message = error_of(path)
    assert message.startswith(f"{path}: backbone.name: unknown backbone 'embeded'")
    assert "(did you mean 'embedded'?)" in message
    assert "valid: embedded" in message
    message = error_of(write(tmp_path / "ok.yaml", "seed: 1\n"), ["dataset.name=synthetic_shape"])
    assert message.startswith("override 'dataset.name=synthetic_shape': dataset.name: ")
    assert "(did you mean 'synthetic_shapes'?)" in message


def test_bad_component_parameter_is_reported_with_its_section(tmp_path: Path):
    base = write(tmp_path / "base.yaml", "backbone: {name: embedded, hiden_size: 16}\n")
    child = write(tmp_path / "child.yaml", "inherit: base.yaml\n")
    message = error_of(child)
    assert message.startswith(f"{base}: backbone.hiden_size: unknown key")
    assert "(did you mean 'hidden_size'?)" in message
    path = write(tmp_path / "r.yaml", "backbone: {name: embedded, hidden_size: wide}\n")
    message = error_of(path)
    assert message.startswith(f"{path}: backbone.hidden_size: ")
    assert "integer" in message and "got 'wide'" in message
    message = error_of(path, ["backbone.hidden_size=4"])  # below the declared minimum
    assert message.startswith("override 'backbone.hidden_size=4': backbone.hidden_size: ")


def test_missing_inherited_file(tmp_path: Path):
    path = write(tmp_path / "r.yaml", "inherit: [nope.yaml]\n")
    message = error_of(path)
    assert message.startswith(f"{path}: inherit: 'nope.yaml' not found")
    assert str(tmp_path / "nope.yaml") in message


def test_missing_recipe_file(tmp_path: Path):
    assert error_of(tmp_path / "absent.yaml") == f"{tmp_path / 'absent.yaml'}: file not found"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("seed: 1\ntrain:\n  steps: 10\n  lr: : 3\n", ":4:7:"),
        ("train:\n  steps: 10\n\tlr: 1\n", ":3:1:"),
        ("seed: 1\ntrain: {steps: 10\n", ":3:1:"),
    ],
)
def test_invalid_yaml_names_line_and_column(tmp_path: Path, text: str, where: str):
    path = write(tmp_path / "r.yaml", text)
    assert error_of(path).startswith(f"{path}{where} invalid YAML: ")


def test_yaml_that_pyyaml_cannot_construct_is_a_recipe_error(tmp_path: Path):
    # PyYAML raises ValueError (not YAMLError) for an impossible date
    path = write(tmp_path / "r.yaml", "description: 2020-13-45\n")
    assert error_of(path).startswith(f"{path}: invalid YAML: ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- 1\n- 2\n", "a recipe must be a mapping of keys, got list"),
        ("just text\n", "a recipe must be a mapping of keys, got str"),
        ("inherit: 3\n", "inherit: expected a file path or a list of them, got 3"),
        ("name: a/b\n", "must be a plain folder name"),
    ],
)
def test_structural_errors(tmp_path: Path, text: str, expected: str):
    path = write(tmp_path / "r.yaml", text)
    message = error_of(path)
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_recipe_errors_are_usage_errors():
    assert issubclass(RecipeError, UsageError)


# -- round trip -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_dump_then_load_gives_an_equal_recipe(tmp_path: Path, path: Path):
    recipe = load_recipe(path, ["train.steps=7", "train.betas=[0.8, 0.95]"])
    dumped = write(tmp_path / "elsewhere.yaml", dump_recipe(recipe))
    again = load_recipe(dumped)
    assert again == recipe
    assert again.to_dict() == recipe.to_dict()
    assert dump_recipe(again) == dump_recipe(recipe)


# -- JSON Schema ------------------------------------------------------------------------------


def test_json_schema_is_serialisable_and_lists_components():
    schema = json.loads(json.dumps(recipe_json_schema()))
    properties = schema["properties"]
    assert {"name", "train", "eval", "backbone", "dataset", "inherit"} <= set(properties)
    backbones = {alt.get("title"): alt for alt in properties["backbone"]["anyOf"]}
    embedded = backbones["embedded"]
    assert embedded["properties"]["name"] == {
        "const": "embedded",
        "description": embedded["properties"]["name"]["description"],
    }
    assert embedded["properties"]["name"]["description"]
    assert {"hidden_size", "num_layers", "encoder", "image_size"} <= set(embedded["properties"])
    assert embedded["required"][0] == "name"
    assert "import path" in backbones  # file.py:attr / package.module:attr alternative
    datasets = {alt.get("title") for alt in properties["dataset"]["anyOf"]}
    assert "synthetic_shapes" in datasets
    # every $ref points at a definition that exists
    text = json.dumps(schema)
    for ref in {part.split('"')[0] for part in text.split('"$ref": "')[1:]}:
        assert ref.startswith("#/$defs/")
        assert ref.removeprefix("#/$defs/") in schema["$defs"], ref


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_resolved_recipe_validates_against_the_json_schema(path: Path):
    jsonschema = pytest.importorskip("jsonschema")
    schema = recipe_json_schema()
    jsonschema.validate(load_recipe(path).to_dict(), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(load_recipe(path).to_dict() | {"trian": {}}, schema)


def test_recipe_model_is_strict():
    with pytest.raises(ValueError):
        Recipe.model_validate({"name": "x", "unknown": 1})


def test_name_is_never_inherited_from_a_base(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base_run\ntrain: {steps: 3}\n")
    (tmp_path / "child.yaml").write_text("inherit: base.yaml\n")
    child = load_recipe(tmp_path / "child.yaml")
    assert child.name == "child" and child.train.steps == 3
    assert load_recipe(tmp_path / "child.yaml", ["name=custom"]).name == "custom"


def test_component_section_without_name_keeps_default_component(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train: {steps: 2}\n")
    recipe = load_recipe(path, ["backbone.hidden_size=64"])
    assert recipe.backbone.name == "embedded" and recipe.backbone.params["hidden_size"] == 64


def test_duplicate_yaml_keys_are_rejected(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(RecipeError, match=r"dup\.yaml:3:\d+: invalid YAML: duplicate key 'lr'"):
        load_recipe(path)
