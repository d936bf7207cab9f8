"""A run's model and dataset, built from its recipe the same way for training, evaluation, export
and warm starts."""

from __future__ import annotations

from inspect import signature
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from crystalkit.components import build_component
from crystalkit.config.schema import Recipe
from crystalkit.config.sources import Sources
from crystalkit.config.stages import plan_stages
from crystalkit.crystal.method import Method
from crystalkit.data.prompt import template_text
from crystalkit.latents.blocks import train_only_rows
from crystalkit.models.backbone import Backbone
from crystalkit.registries import BACKBONES, DATASETS
from crystalkit.runs.snapshot import load_snapshot, snapshot_dir

if TYPE_CHECKING:
    from peft import PeftModel


def build_dataset(recipe: Recipe) -> Any:
    return build_component(DATASETS, recipe.dataset.name, recipe.dataset.params)


def build_backbone(
    recipe: Recipe, dataset: Any, assets: Path | None = None, device: torch.device | None = None
) -> Backbone:
    """A fresh backbone, reusing the run's saved assets (tokenizer, ...) when ``assets`` has them;
    pretrained weights read straight onto ``device`` (see :meth:`Backbone.create`)."""
    spec = recipe.backbone
    latent = recipe.latents.template
    corpus = [*dataset.corpus(), template_text(latent.open, latent.close)]
    context: dict[str, Any] = {"corpus": corpus, "assets": assets}
    if device is not None and "device" in signature(BACKBONES.get(spec.name).create).parameters:
        context["device"] = device  # a plugin whose create() predates it is built on the CPU
    return build_component(BACKBONES, spec.name, spec.params, **context)


class Model(NamedTuple):
    """A run's model: the backbone, the recipe's :class:`Method` on it (its last stage's: what
    evaluation and generation use), peft's wrapper when the recipe uses LoRA (to merge or save the
    adapter; ``None`` otherwise), and one :class:`Method` per stage with the latent token ids each
    stage introduces (their rows are initialised when the stage begins)."""

    backbone: Backbone
    method: Method
    peft: PeftModel | None
    stage_methods: tuple[Method, ...] = ()
    introduced: tuple[tuple[int, ...], ...] = ()


def build_model(
    recipe: Recipe,
    dataset: Any,
    assets: Path | None = None,
    training: bool = True,
    sources: Sources | None = None,
    device: torch.device | None = None,
) -> Model:
    """The model of a run, built the same way for training, evaluation and export.

    ``training=False`` (evaluation, generation, export) builds the corruption and the objectives
    only when first used; ``sources`` (the run's recorded component sources) then name what to
    install when one of them is missing.

    A LoRA run's checkpoints hold only what trains, so its frozen base must come out exactly
    as training began: initialisation is seeded from ``recipe.seed``, and saved ``assets`` are
    not used (the saved tokenizer already holds the latent tokens, which would change the
    vocabulary the model is built with and so its init); the checkpoint's base fingerprint
    checks the result. A warm-started run is built from its snapshot of the source
    (:mod:`crystalkit.runs.snapshot`) under ``assets``. Every stage's latent tokens are added
    before LoRA: peft must see the resized token matrices to keep the new rows trainable. A
    dataset with ``bind_tokenizer`` gets the backbone's tokenizer first (``llava_json`` bounds its
    records' token counts with it), so training and evaluation read the same bounded splits.
    ``device``: where training will run; pretrained weights are read straight onto it.
    """
    torch.manual_seed(recipe.seed)
    warm = snapshot_dir(recipe, assets)
    if warm is not None:
        backbone = build_backbone(recipe, dataset, assets=warm, device=device)
        load_snapshot(backbone, warm)
    else:
        backbone = build_backbone(
            recipe, dataset, assets=None if recipe.lora.enabled else assets, device=device
        )
    bind = getattr(dataset, "bind_tokenizer", None)  # optional: datasets that count tokens
    if bind is not None:
        bind(backbone.tokenizer)
    inherited = set(backbone.tokenizer.get_vocab()) if warm is not None else set()
    methods, introduced, seen = [], [], set(inherited)
    for stage in plan_stages(recipe):
        method = Method(
            stage.recipe,
            backbone,
            training=training,
            sources=sources,
            object_attributes=getattr(dataset, "object_attributes", None),
        )
        tokens = backbone.tokenizer.convert_ids_to_tokens(method.block.new_token_ids)
        fresh = [
            i for t, i in zip(tokens, method.block.new_token_ids, strict=True) if t not in seen
        ]
        introduced.append(tuple(fresh) if stage.index else ())
        seen.update(tokens)
        methods.append(method)
    token_ids = sorted({i for m in methods for i in m.block.new_token_ids})
    if recipe.latents.train_new_rows_only:
        train_only_rows(backbone.token_matrices(), token_ids)
    peft = None
    if recipe.lora.enabled:
        from crystalkit.models.lora import apply_lora  # peft takes a second to import

        peft = apply_lora(backbone, recipe.lora, token_ids)
    return Model(backbone, methods[-1], peft, tuple(methods), tuple(introduced))
