"""One way to build a component, one table of the recipe keys that name components, and
objectives that declare what their value is a mean over."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

from crystalkit.components import ComponentError, ParamsError, build_component, validate_params
from crystalkit.config.keys import COMPONENT_KEYS, component_name, components, key_of
from crystalkit.config.loader import load_recipe
from crystalkit.config.schema import ComponentSpec
from crystalkit.config.sources import record_sources
from crystalkit.crystal.method import Method
from crystalkit.errors import PluginError, RecipeError, UsageError
from crystalkit.objectives.contract import DEFAULT_UNITS, UNITS, objective_units
from crystalkit.registries import CORRUPTIONS, OBJECTIVES
from crystalkit.registry import Registry
from crystalkit.runs.build import build_backbone, build_dataset
from crystalkit.testing import ContractError, check_objective
from crystalkit.training.distributed import ShardLoss

ROOT = Path(__file__).resolve().parents[1]

# -- build_component --------------------------------------------------------------------------


class Plain:
    """Typed keyword arguments, one checked in the constructor."""

    def __init__(self, size: int = 3, scale: tuple[float, float] = (0.0, 1.0)):
        if size > 10:
            raise ValueError(f"size must be <= 10, got {size}")
        self.size, self.scale = size, scale


class Declared:
    """A declared Config: received whole."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        depth: int = Field(2, ge=1)

    def __init__(self, config: Declared.Config, **context: Any):
        self.config, self.context = config, context


class Made:
    """Built through a factory classmethod, with context."""

    class Config(BaseModel):
        width: int = 4

    def __init__(self, config: Made.Config, corpus: list[str]):
        self.config, self.corpus = config, corpus

    @classmethod
    def create(cls, config: Made.Config, *, corpus: list[str]) -> Made:
        return cls(config, corpus)


def _broken(fail: bool = True) -> None:
    raise KeyError("a bug in the plugin")


class _OwnBug:
    __module__ = "crystalkit.components_under_test"  # as if crystalkit defined it

    def __init__(self) -> None:
        raise KeyError("a bug in crystalkit")


@pytest.fixture
def registry() -> Registry:
    kinds = Registry("widgets")
    kinds.add("plain", Plain)
    kinds.add("declared", Declared)
    kinds.add("broken", _broken)
    return kinds


def test_keyword_components_get_validated_keywords(registry: Registry):
    built = build_component(registry, "plain", {"size": 4, "scale": [0.5, 2]})
    assert isinstance(built, Plain) and built.size == 4
    assert built.scale == (0.5, 2.0)  # validated (the recipe's list became the declared tuple)
    assert build_component(registry, "plain").size == 3  # defaults filled in


def test_a_declared_config_is_passed_whole_with_the_context(registry: Registry):
    built = build_component(registry, "declared", {"depth": 5}, device="cpu")
    assert isinstance(built.config, Declared.Config) and built.config.depth == 5
    assert built.context == {"device": "cpu"}


def test_a_registry_factory_builds_through_it():
    widgets = Registry("widgets", factory="create")
    widgets.add("made", Made)
    built = build_component(widgets, "made", {"width": 7}, corpus=["a b"])
    assert built.config.width == 7 and built.corpus == ["a b"]


def test_already_validated_parameters_are_not_validated_again(registry: Registry):
    config = validate_params(registry, "plain", {"size": 2})
    assert build_component(registry, "plain", config).size == 2


@pytest.mark.parametrize(
    ("name", "params", "error", "text"),
    [
        ("plain", {"sise": 2}, ParamsError, "widget 'plain': sise: Extra inputs are not permitted"),
        ("plain", {"size": "x"}, ParamsError, "widget 'plain': size: Input should be a valid"),
        ("declared", {"depth": 0}, ParamsError, "widget 'declared': depth: Input should be"),
        ("plain", {"size": 11}, ComponentError, "widget 'plain': size must be <= 10, got 11"),
        ("nope", {}, UsageError, "unknown widget 'nope'"),
    ],
)
def test_bad_parameters_are_one_line_naming_the_component(registry, name, params, error, text):
    with pytest.raises(error) as info:
        build_component(registry, name, params)
    assert text in str(info.value) and "\n" not in str(info.value)


def test_params_error_keeps_what_the_loader_needs_to_name_the_file(registry: Registry):
    with pytest.raises(ParamsError) as info:
        validate_params(registry, "plain", {"sise": 2})
    assert info.value.model is not None and info.value.error.error_count() == 1
    assert "parameters: size, scale" in str(info.value)


def test_third_party_failures_are_plugin_errors_and_builtin_ones_keep_their_traceback(
    registry: Registry,
):
    with pytest.raises(PluginError, match=r"widget 'broken' \(module .*\) raised KeyError"):
        build_component(registry, "broken")
    builtins = Registry("widgets")
    builtins.add("bug", _OwnBug)  # crystalkit's own code is not blamed on a plugin
    with pytest.raises(KeyError, match="a bug in crystalkit"):
        build_component(builtins, "bug")


# -- the recipe-key table ---------------------------------------------------------------------


def _every_spec(node: Any, where: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Slow reference: where every ComponentSpec sits in a validated recipe, by walking every
    field, mapping and list."""
    if isinstance(node, ComponentSpec):
        return {where}
    if isinstance(node, BaseModel):
        items = [(k, getattr(node, k)) for k in type(node).model_fields]
    elif isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list | tuple):
        items = list(enumerate(node))
    else:
        return set()
    return {loc for key, value in items for loc in _every_spec(value, (*where, str(key)))}


RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "paper" not in p.parts)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_the_key_table_finds_every_component_of_a_recipe(path: Path):
    recipe = load_recipe(path)
    found = {loc for loc, _, _ in components(recipe)}
    assert found == _every_spec(recipe) - {loc for loc in _every_spec(recipe) if loc[0] == "stages"}
    assert all(key_of(loc) is key for loc, key, _ in components(recipe))


def test_component_records_cover_the_stages_too(tiny_recipe):
    recipe = tiny_recipe(
        "method=crystal",
        "stages=[{name: a, fraction: 0.5}, {name: b, fraction: 0.5, corruption: {name: erase}}]",
    )
    records = record_sources(recipe)
    expected = {".".join(loc) for loc in _every_spec(recipe) if loc[0] != "stages"}
    stage_keys = {
        f"stages.{stage.name}.{'.'.join(loc)}"
        for stage in recipe.stages
        for loc in _every_spec(stage)
        if key_of(loc) is not None and key_of(loc).per_stage
    }
    assert set(records) == expected | stage_keys
    assert records["stages.b.corruption"]["name"] == "erase"
    assert {r["kind"] for r in records.values()} <= {k.registry.kind for k in COMPONENT_KEYS}


def test_objectives_are_named_by_their_key(tiny_recipe):
    recipe = tiny_recipe("method=crystal", "objectives={kl: {}, twice: {name: kl, fraction: 1}}")
    names = {loc: component_name(loc, key, spec) for loc, key, spec in components(recipe)}
    assert names[("objectives", "kl")] == "kl" and names[("objectives", "twice")] == "kl"


def test_components_only_training_builds_are_not_looked_up_for_evaluation(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"inherit: {ROOT / 'recipes' / 'crystal_default.yaml'}\n")
    missing = "corruption.name=gone_plugin.py:Gone"
    with pytest.raises(RecipeError, match=r"corruption\.name"):
        load_recipe(recipe, [missing], anchor=tmp_path)
    kept = load_recipe(recipe, [missing], anchor=tmp_path, training=False)
    assert kept.corruption.name.endswith("gone_plugin.py:Gone")


# -- objectives declare their units -----------------------------------------------------------


@pytest.mark.parametrize("name", [e.name for e in OBJECTIVES.entries() if e.source == "builtin"])
def test_every_builtin_objective_declares_its_units(name: str):
    objective = build_component(OBJECTIVES, name)
    assert hasattr(type(objective), "units")  # declared, not the default for undeclared ones
    assert objective_units(objective) in UNITS


class WithoutUnits:
    attention_layers = ()
    needs_hidden = False

    def __call__(self, outputs):
        return outputs.corrupted_logits.logsumexp(-1).mean()


class TokenMean(WithoutUnits):
    units = "answer_tokens"


class BadUnits(WithoutUnits):
    units = "tokens"


def test_an_objective_without_units_gets_the_documented_default():
    assert DEFAULT_UNITS == "samples"
    assert objective_units(WithoutUnits()) == "samples"
    assert objective_units(TokenMean()) == "answer_tokens"


def test_the_contract_checks_declared_units():
    check_objective(TokenMean())
    with pytest.raises(ContractError, match="declares units='tokens'; expected one of"):
        check_objective(BadUnits())


def test_the_distributed_loss_reads_units_from_the_objectives(tiny_recipe):
    recipe = tiny_recipe(
        "method=crystal",
        "latents.schedule.k=2",
        f"objectives={{kl: {{}}, own: {{name: {__file__}:TokenMean}}, "
        f"plain: {{name: {__file__}:WithoutUnits}}}}",
    )
    dataset = build_dataset(recipe)
    method = Method(recipe, build_backbone(recipe, dataset))
    units = ShardLoss(method).units
    assert units["kl"] == "answer_samples"  # AnswerKL's own declaration
    assert units["own"] == "answer_tokens" and units["plain"] == "samples"


def test_a_plugin_objective_with_bad_units_fails_when_the_recipe_loads(tiny_recipe):
    with pytest.raises(PluginError, match="declares units='tokens'"):
        tiny_recipe("method=crystal", f"objectives={{bad: {{name: {__file__}:BadUnits}}}}")


def test_the_corruptions_registry_builds_through_the_same_function():
    blur = build_component(CORRUPTIONS, "blur", {"radius": [1, 2]})
    assert blur.radius == (1.0, 2.0)
