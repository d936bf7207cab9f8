"""Recipe -> components: the one place where registry names become objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crystalkit.config.components import config_model
from crystalkit.config.schema import ComponentSpec, Recipe
from crystalkit.data.prompt import template_text
from crystalkit.models.backbone import Backbone
from crystalkit.registries import BACKBONES, DATASETS


def _params(obj: Any, spec: ComponentSpec) -> Any:
    return config_model(obj).model_validate(spec.params)


def build_dataset(recipe: Recipe) -> Any:
    cls = DATASETS.get(recipe.dataset.name)
    return cls(_params(cls, recipe.dataset))


def build_backbone(recipe: Recipe, dataset: Any, assets: Path | None = None) -> Backbone:
    """A fresh backbone, reusing the run's saved assets (tokenizer, ...) when ``assets`` has them."""
    cls = BACKBONES.get(recipe.backbone.name)
    corpus = [*dataset.corpus(), template_text()]
    return cls.create(_params(cls, recipe.backbone), corpus=corpus, assets=assets)
