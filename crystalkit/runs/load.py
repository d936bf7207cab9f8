"""Load a run back from its directory (or an export folder), for evaluation, export and warm
starts: its recipe, dataset and model with the latest weights."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from crystalkit.config.loader import load_recipe
from crystalkit.config.schema import Recipe
from crystalkit.config.sources import require
from crystalkit.crystal.method import Method
from crystalkit.device import check_device
from crystalkit.errors import CheckpointError
from crystalkit.io import read_yaml
from crystalkit.models.backbone import Backbone
from crystalkit.runs.build import Model, build_dataset, build_model
from crystalkit.runs.checkpoint import base_fingerprint, latest_checkpoint, load_weights
from crystalkit.runs.files import CHECKPOINTS_DIR, EXPORT_BUFFERS, EXPORT_FILE, RECIPE_FILE
from crystalkit.runs.sources import read_sources, warn_code_changes


def load_run(
    run_dir: Path, overrides: Sequence[str] = ()
) -> tuple[Recipe, object, Backbone, Method, int]:
    """The run's resolved recipe, dataset, backbone with its latest weights, method, and step."""
    recipe, dataset, model, step = load_run_model(run_dir, overrides)
    return recipe, dataset, model.backbone, model.method, step


def load_run_model(
    run_dir: Path, overrides: Sequence[str] = ()
) -> tuple[Recipe, object, Model, int]:
    """The run's resolved recipe, dataset, model (:func:`build_model`) with its latest weights,
    and step. Training-only components (corruption, objectives) are built when first used, so a
    run evaluates after the plugin that corrupted its images is gone; a needed component that is
    missing is an error naming what to install."""
    if not run_dir.is_dir():
        raise CheckpointError(
            f"{run_dir}: not a directory (expected a run made by crystalkit train)"
        )
    if not (run_dir / RECIPE_FILE).is_file():
        raise CheckpointError(f"{run_dir}: no {RECIPE_FILE}; not a crystalkit run directory")
    sources = read_sources(run_dir)
    tree = read_yaml(run_dir / RECIPE_FILE, CheckpointError)
    if not isinstance(tree, dict):
        found = "an empty file" if tree is None else type(tree).__name__
        raise CheckpointError(
            f"{run_dir / RECIPE_FILE}: not a recipe (expected the run's resolved recipe, a "
            f"mapping of keys; got {found})"
        )
    require(run_dir, tree, sources)
    warn_code_changes(run_dir, sources)
    recipe = load_recipe(run_dir / RECIPE_FILE, overrides, training=False)
    check_device(recipe.device, f"{run_dir / RECIPE_FILE}: device")  # trained elsewhere?
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise CheckpointError(
            f"{run_dir}: no complete checkpoint under {run_dir / CHECKPOINTS_DIR}"
        )
    dataset = build_dataset(recipe)
    model = build_model(recipe, dataset, assets=run_dir, training=False, sources=sources)
    model.backbone.to(recipe.device)
    load_weights(model.backbone, checkpoint)
    return recipe, dataset, model, checkpoint.step


#: the reference's input size, for datasets and backbones that name none
DEFAULT_IMAGE_SIZE = 448


def run_image_size(dataset: object, backbone: Backbone) -> int | None:
    """The square size of the run's samples: its dataset's ``image_size`` (the backbone resizes
    from there, as in training), else the backbone's input size; ``None`` (native size) when the
    backbone resizes each image itself (``resolution: processor``) or the dataset keeps native
    sizes (``image_size: null``)."""
    if backbone.resizes_itself:
        return None
    config = getattr(dataset, "config", None)
    if hasattr(config, "image_size") and config.image_size is None:
        return None
    for component in (dataset, backbone):
        size = getattr(getattr(component, "config", None), "image_size", None)
        if isinstance(size, int):
            return size
    return DEFAULT_IMAGE_SIZE


def without_lora(recipe: Recipe) -> Recipe:
    return recipe.model_copy(update={"lora": recipe.lora.model_copy(update={"enabled": False})})


def read_export(directory: Path) -> dict[str, Any] | None:
    """An export folder's ``export.json`` (``None`` when it is not an export, or unreadable)."""
    try:
        summary = json.loads((directory / EXPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return summary if isinstance(summary, dict) else None


def load_adapter(directory: Path) -> Model:
    """The model of an adapter export: the base rebuilt from its recipe as training began
    (:func:`~crystalkit.runs.build.build_model` without LoRA), peft's ``PeftModel.from_pretrained``,
    then the base's buffers. Adapters stay trainable, as in the run."""
    from peft import PeftModel  # a second to import: only for adapter exports

    from crystalkit.models.lora import base_buffers, peft_host

    summary = read_export(directory)
    if summary is None or summary.get("merged") is not False:
        raise CheckpointError(f"{directory}: not an adapter export of crystalkit export")
    recipe = load_recipe(directory / RECIPE_FILE, training=False)
    warm = directory if recipe.warm_start.source is not None else None  # its snapshot is here
    built = build_model(without_lora(recipe), build_dataset(recipe), assets=warm, training=False)
    backbone, method = built.backbone, built.method
    try:
        peft = PeftModel.from_pretrained(peft_host(backbone), str(directory), is_trainable=True)
        buffers = (
            load_file(str(directory / EXPORT_BUFFERS))
            if (directory / EXPORT_BUFFERS).is_file()
            else {}
        )
    except (ValueError, OSError, SafetensorError) as exc:
        raise CheckpointError(f"{directory}: cannot load the adapter: {exc}") from None
    if base_fingerprint(backbone) != summary.get("base"):
        raise CheckpointError(
            f"{directory}: the adapter was trained on another base model than its recipe builds"
        )
    expected = base_buffers(backbone)
    if buffers.keys() != expected.keys():
        raise CheckpointError(f"{directory / EXPORT_BUFFERS}: does not match the recipe's model")
    with torch.no_grad():
        for name, value in buffers.items():
            backbone.get_buffer(name).copy_(value)
    backbone.to(recipe.device)
    return Model(backbone, method, peft)
