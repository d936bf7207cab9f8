"""Recipes: YAML files validated into typed config objects."""

from crystalkit.config.loader import load_recipe
from crystalkit.config.schema import ComponentSpec, EvalConfig, PromptConfig, Recipe, TrainConfig

__all__ = ["ComponentSpec", "EvalConfig", "PromptConfig", "Recipe", "TrainConfig", "load_recipe"]
