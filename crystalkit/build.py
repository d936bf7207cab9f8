"""Recipe -> components: the one place where registry names become objects."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from crystalkit.config.components import config_model
from crystalkit.config.schema import ComponentSpec, Recipe
from crystalkit.crystal.method import Method
from crystalkit.data.prompt import template_text
from crystalkit.models.backbone import Backbone
from crystalkit.registries import BACKBONES, DATASETS

if TYPE_CHECKING:
    from peft import PeftModel


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


class Model(NamedTuple):
    """A run's model: the backbone, the recipe's :class:`Method` on it, and peft's wrapper when
    the recipe uses LoRA (to merge or save the adapter; ``None`` otherwise)."""

    backbone: Backbone
    method: Method
    peft: PeftModel | None


def build_model(recipe: Recipe, dataset: Any, assets: Path | None = None) -> Model:
    """The model of a run, built the same way for training, evaluation and export.

    A LoRA run's checkpoints hold only what trains, so its frozen base must come out exactly
    as training began: initialisation is seeded from ``recipe.seed``, and saved ``assets`` are
    not used (the saved tokenizer already holds the latent tokens, which would change the
    vocabulary the model is built with and so its init); the checkpoint's base fingerprint
    checks the result. LoRA comes after the :class:`Method`, which adds the latent tokens: peft
    must see the resized token matrices to keep the new rows trainable.
    """
    torch.manual_seed(recipe.seed)
    backbone = build_backbone(recipe, dataset, assets=None if recipe.lora.enabled else assets)
    method = Method(recipe, backbone)
    if not recipe.lora.enabled:
        return Model(backbone, method, None)
    from crystalkit.models.lora import apply_lora  # peft takes a second to import

    return Model(backbone, method, apply_lora(backbone, recipe.lora, method.block.new_token_ids))
