"""The command line: listing components, showing/validating recipes and the schema; user mistakes
are one ``error:`` line with exit code 2, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cli_process import assert_one_error_line, finish, invoke, start

from crystalkit.config.json_schema import recipe_json_schema
from crystalkit.config.loader import load_recipe

ROOT = Path(__file__).resolve().parents[1]
DIRECT = ROOT / "recipes" / "direct_finetune.yaml"


# -- list -------------------------------------------------------------------------------------


def test_list_shows_every_kind_with_builtins():
    result = invoke("list")
    assert result.exit_code == 0
    for text in ("backbones", "datasets", "corruptions", "objectives", "schedules"):
        assert text in result.stdout
    for name in ("embedded", "synthetic_shapes", "none", "kl", "attention", "cosine", "fixed"):
        assert name in result.stdout
    assert "built-in" in result.stdout


def test_list_one_kind():
    result = invoke("list", "corruptions")
    assert result.exit_code == 0
    assert "Identity" in result.stdout  # the docstring's first line
    assert "corruptions" in result.stdout
    assert "backbones" not in result.stdout
    assert "embedded" not in result.stdout


def test_list_unknown_kind_is_one_line_with_valid_kinds():
    line = assert_one_error_line(invoke("list", "nonsense"))
    assert "unknown kind 'nonsense'" in line
    assert "valid: backbones, datasets, corruptions, objectives, schedules" in line
    line = assert_one_error_line(invoke("list", "corruptoins"))
    assert "(did you mean 'corruptions'?)" in line


def test_list_one_component_shows_its_parameters_and_source(monkeypatch: pytest.MonkeyPatch):
    """Every parameter row: key, type, default, constraint, description (from the docstring's
    Args section for keyword arguments, from Field descriptions for pydantic configs)."""
    from rich.console import Console

    from crystalkit.params import config_model
    from crystalkit.registries import ALL

    monkeypatch.setattr("crystalkit.cli.out", Console(width=400))  # no wrapped cells

    for kind, name in (("corruption", "blur"), ("objectives", "kl"), ("backbone", "embedded")):
        result = invoke("list", kind, name)
        assert result.exit_code == 0, result.output
        text = " ".join(result.stdout.split())  # rich wraps long cells
        assert f"{kind.removesuffix('s')} {name} (built-in)" in text
        registry = ALL[kind if kind.endswith("s") else f"{kind}s"]
        for key, field in config_model(registry.get(name)).model_fields.items():
            assert key in text
            first_words = " ".join(field.description.replace("`", "").split())
            assert first_words in text, (kind, name, key)
    assert "≥ 16" in " ".join(invoke("list", "backbone", "embedded").stdout.split())


def test_list_descriptions_keep_brackets_and_drop_rst_markup():
    text = " ".join(invoke("list", "objectives").stdout.split())
    assert "sg[h_intact]" in text  # not swallowed as rich markup
    assert "`" not in text  # code spans are styled, not backticked
    assert "averaged over answer rows and layers" in text  # the whole first paragraph


def test_list_one_component_by_import_path_and_unknown_name(tmp_path: Path):
    plugin = tmp_path / "darken.py"
    plugin.write_text(
        "class Darken:\n"
        '    """Scale every pixel.\n\n    Args:\n        factor: the scale, in [0, 1].\n    """\n\n'
        "    def __init__(self, factor: float = 0.5):\n        self.factor = factor\n"
    )
    result = invoke("list", "corruptions", f"{plugin}:Darken")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert f"(file {plugin})" in text
    assert "factor │ float │ 0.5" in text and "the scale, in [0, 1]." in text
    line = assert_one_error_line(invoke("list", "corruptions", "blurr"))
    assert "unknown corruption 'blurr' (did you mean 'blur'?)" in line


# -- recipe show / validate / schema ----------------------------------------------------------


def test_recipe_show_applies_overrides_and_prints_reloadable_yaml(tmp_path: Path):
    overrides = ["train.steps=7", "train.lr=0.01", "~eval.max_samples", "name=shown"]
    result = invoke("recipe", "show", DIRECT, *overrides)
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert shown["train"]["steps"] == 7
    assert shown["train"]["lr"] == 0.01
    assert shown["eval"]["max_samples"] is None
    assert shown["name"] == "shown"
    assert shown == load_recipe(DIRECT, overrides).to_dict()
    saved = tmp_path / "shown.yaml"
    saved.write_text(result.stdout)
    assert load_recipe(saved) == load_recipe(DIRECT, overrides)


def test_recipe_show_bad_override_is_one_line():
    line = assert_one_error_line(invoke("recipe", "show", DIRECT, "train.stpes=3"))
    assert "override 'train.stpes=3'" in line
    assert "did you mean 'steps'?" in line
    line = assert_one_error_line(invoke("recipe", "show", DIRECT, "train.lr"))
    assert "expected KEY=VALUE" in line


def test_recipe_validate_ok():
    result = invoke("recipe", "validate", DIRECT, ROOT / "recipes" / "crystal_default.yaml")
    assert result.exit_code == 0
    assert f"ok {DIRECT} (direct_finetune)" in result.stdout
    assert "(crystal_default)" in result.stdout


def test_recipe_validate_failure_is_one_line(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: -3\n")
    result = invoke("recipe", "validate", DIRECT, bad)
    line = assert_one_error_line(result)
    assert line.startswith(f"error: {bad}: train.steps: ")
    assert "got -3" in line
    assert "ok" in result.stdout  # the valid recipe before it was reported
    assert_one_error_line(invoke("recipe", "validate", tmp_path / "missing.yaml"))


def test_recipe_schema_to_file_and_stdout(tmp_path: Path):
    target = tmp_path / "sub" / "recipe.schema.json"
    result = invoke("recipe", "schema", "-o", target)
    assert result.exit_code == 0
    assert result.stdout == ""
    written = json.loads(target.read_text())
    assert written == json.loads(json.dumps(recipe_json_schema()))
    assert "embedded" in {alt.get("title") for alt in written["properties"]["backbone"]["anyOf"]}
    printed = invoke("recipe", "schema")
    assert printed.exit_code == 0
    assert json.loads(printed.stdout) == written


# -- a real process ---------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def validate_process():
    """Started when this module's first test runs, so its imports overlap the in-process tests."""
    process = start("recipe", "validate", "recipes/direct_finetune.yaml")
    yield process
    if process.poll() is None:
        process.kill()
        process.communicate()


@pytest.mark.parametrize("args", [[], ["recipe"]])
def test_no_arguments_prints_help(args: list[str]):
    result = invoke(*args)
    assert "Usage" in result.output


def test_subprocess_bad_override_is_one_error_line():
    bad = finish(start("recipe", "show", "recipes/direct_finetune.yaml", "train.lr=[1"))
    assert bad.returncode == 2
    assert bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1, bad.stderr
    assert lines[0].startswith("error: override 'train.lr=[1': value is not valid YAML")


def test_subprocess_validate(validate_process):  # keep last: it waits for the process
    ok = finish(validate_process)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "ok recipes/direct_finetune.yaml (direct_finetune)"
    assert "Traceback" not in ok.stderr
